"""The Rouge-L wrapper against hand-computed values (LCS-based F-measure x100, stemming, max over refs)."""

import pytest

from pipeline.evaluation import rouge_l


def test_lcs_f_measure_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3; P = 3/3, R = 3/6; F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    # LCS("a b c d", "a x c y") = 2 ("a c"); P = R = 2/4; F = 1/2.
    assert rouge_l("a b c d", ["a x c y"]) == pytest.approx(50.0)


def test_stemming_case_and_punctuation():
    assert rouge_l("Cats running!", ["cat runs"]) == pytest.approx(100.0)


def test_max_over_references_and_zero():
    assert rouge_l("red apple", ["blue sky", "a red apple"]) == pytest.approx(100 * 2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rouge_l("nothing shared", ["blue sky"]) == 0.0
    assert rouge_l("", ["blue sky"]) == 0.0
