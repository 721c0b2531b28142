"""The n-gram proposer and --speculative-config's checks."""
import pytest

from tandem.config import EngineConfig
from tandem.spec.config import SpeculativeConfig
from tandem.spec.ngram import propose_ngram


def test_the_longest_recurring_suffix_proposes_what_followed_it():
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 3, 9, 2, 3, 8, 1, 2, 3]
    # suffix 1 2 3 recurs at 1..3 (then 9); the shorter 2 3 recurs later, at 5..6 (then 8):
    # the longest match wins.
    assert propose_ngram(tokens, 3, 2, 5) == [9, 2, 3]
    assert propose_ngram(tokens, 3, 2, 2) == [8, 1, 2]  # only bigrams: the latest one
    assert propose_ngram(tokens, 1, 2, 5) == [9]


def test_no_recurrence_no_proposal():
    assert propose_ngram([1, 2, 3, 4, 5], 4, 1, 3) == []
    assert propose_ngram([1, 2, 3, 1, 2], 4, 3, 5) == []  # "1 2" recurs, but n_min is 3
    assert propose_ngram([5], 4, 1, 3) == []
    assert propose_ngram([1, 2, 1, 2], 0, 1, 3) == []


def test_a_proposal_stops_at_the_end_of_the_tokens():
    assert propose_ngram([4, 5, 6, 4, 5], 8, 2, 3) == [6, 4, 5]


def test_config_defaults_and_json():
    c = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}')
    assert c.speculative_config == {"method": "ngram", "num_speculative_tokens": 3,
                                    "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2,
                                    "prompt_lookup_min": 7}).prompt_lookup_max == 7


@pytest.mark.parametrize("value, message", [
    ("{", r"^speculative_config: not valid JSON"),
    ("[1]", r"^speculative_config: must be a JSON object"),
    ({"method": "eagle", "num_speculative_tokens": 2}, r"^speculative_config.method: must be"),
    ({"method": "ngram"}, r"^speculative_config.num_speculative_tokens: must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 17}, r"num_speculative_tokens: .*\[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": True}, r"num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 3}, r"^speculative_config.prompt_lookup_max: .*\[4, 64\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "m"},
     r"^speculative_config.model: only for"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 1},
     r"^speculative_config.k: unknown field"),
])
def test_bad_configs_name_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)
