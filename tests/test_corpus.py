from runtime.models.corpus import HELD_OUT_WORKS, load_shakespeare


def test_held_out_works_are_never_in_the_training_split():
    corpus = load_shakespeare()
    assert len(corpus.held_out) == len(HELD_OUT_WORKS)
    hamlet_line = "To be, or not to be"
    assert any(hamlet_line in text for text in corpus.held_out)
    assert not any(hamlet_line in text for text in corpus.train)
    assert len(corpus.train) > 30
