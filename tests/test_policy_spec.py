"""The policy spec grammar: one parser, one printer, JSON round trip."""

import re

import pytest

from sere_jax import policy_spec


@pytest.mark.parametrize("text, expected", [
    ("none", policy_spec.PolicySpec("none")),
    ("topk_truncate:2", policy_spec.PolicySpec("topk_truncate", 2)),
    ("sere:2:0.3", policy_spec.PolicySpec("sere", 2, threshold=0.3)),
    ("sere:2:0.3:cosine", policy_spec.PolicySpec("sere", 2, 0.3, metric="cosine")),
    ("sere:2", policy_spec.PolicySpec("sere", 2)),
    ("sere:2:cosine", policy_spec.PolicySpec("sere", 2, metric="cosine")),
    ("oea:3", policy_spec.PolicySpec("oea", 3)),
    ("random:1:seed7", policy_spec.PolicySpec("random", 1, seed=7)),
    ("sere_hybrid:2:0:0.5", policy_spec.PolicySpec("sere_hybrid", 2, 0.0, score_weight=0.5)),
    ("sere_hybrid:1:0.2:0.7:weights",
     policy_spec.PolicySpec("sere_hybrid", 1, 0.2, score_weight=0.7, metric="weights")),
    ("sere:2:q0.5", policy_spec.PolicySpec("sere", 2, quantile=0.5)),
    ("sere:2:0:cosine:min8", policy_spec.PolicySpec("sere", 2, metric="cosine", min_batch=8)),
    ("topk_truncate:2:min4", policy_spec.PolicySpec("topk_truncate", 2, min_batch=4)),
    ("topk_truncate:2:renorm", policy_spec.PolicySpec("topk_truncate", 2, renormalize=True)),
    ("keep_active:1:raw", policy_spec.PolicySpec("keep_active", 1, renormalize=False)),
    ("expert_pool:12", policy_spec.PolicySpec("expert_pool", pool_size=12)),
    ("expert_pool:12:cosine", policy_spec.PolicySpec("expert_pool", pool_size=12,
                                                     metric="cosine")),
    ("oracle:2", policy_spec.PolicySpec("oracle", 2)),
    ("sere:1:0.3:prefill", policy_spec.PolicySpec("sere", 1, 0.3, decode_only=False)),
])
def test_parse_valid(text, expected):
  spec = policy_spec.parse(text)
  assert spec == expected
  assert policy_spec.parse(spec.text) == spec  # canonical text round-trips
  assert spec.label.startswith(spec.policy)


def test_labels():
  assert policy_spec.parse("sere:2:q0.5:cosine:min8").label == (
      "sere S=2 rho=q0.5 cosine min_batch=8")
  assert policy_spec.parse("sere_hybrid:2:0:0.5").text == "sere_hybrid:2:0:0.5"


@pytest.mark.parametrize("text, bad", [
    ("bogus:2", "'bogus'"),
    ("none:2", "'2'"),
    ("sere", "(missing)"),
    ("sere:x", "'x'"),
    ("sere:0", "'0'"),
    ("sere:2:1.5", "'1.5'"),
    ("sere:2:q2", "'2'"),
    ("sere:2:0.3:nometric", "'nometric'"),
    ("topk_truncate:2:cosine", "'cosine'"),
    ("sere:2:0:cosine:weights", "'weights'"),
    ("sere_hybrid:2:0:q0.5", "'q0.5'"),
    ("oea:2:0.3", "'0.3'"),
    ("sere:2:renorm", "'renorm'"),
    ("keep_active:2:renorm:raw", "'raw'"),
    ("expert_pool:0", "'0'"),
    ("sere:2:min4:min8", "'min8'"),
])
def test_parse_errors_name_the_token(text, bad):
  with pytest.raises(ValueError, match=re.escape(bad)):
    policy_spec.parse(text)


def test_parse_specs_rejects_duplicates():
  with pytest.raises(ValueError, match="repeats"):
    policy_spec.parse_list(["sere:2", "sere:2:0"])


def test_json_round_trip_and_config():
  spec = policy_spec.parse("sere:2:q0.5:cosine:min8")
  assert policy_spec.PolicySpec.from_json(spec.to_json()) == spec
  config = spec.config(threshold=0.25)
  assert (config.policy, config.select_top_k, config.threshold, config.min_batch) == (
      "sere", 2, 0.25, 8)
  with pytest.raises(ValueError, match="unknown fields"):
    policy_spec.PolicySpec.from_json({"policy": "sere", "bogus": 1})


def test_config_validation_names_the_spec():
  # RerouteConfig's own checks surface with the spec text.
  with pytest.raises(ValueError, match="'sere:2:seed99999999999'"):
    policy_spec.parse("sere:2:seed99999999999")
