"""The wire contract (proto/speed/v1/speed.proto): generated stubs and tensor packing."""
