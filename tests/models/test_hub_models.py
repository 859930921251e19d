"""`model` as a Hub id (ORG/NAME): read from a Hub cache laid out here, never from the network."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from epd import LLM, SamplingParams
from epd.entrypoints.options import EngineArgs
from epd.models.hub import ModelNotFoundError, resolve_model

MAIN = "a" * 40  # the commit refs/main names
V2 = "b" * 40  # the commit refs/v2 (a tag) names
PROMPT = "Once upon a time"


def add_snapshot(cache: Path, repo_id: str, commit: str, checkpoint: Path, *refs: str) -> Path:
    """huggingface_hub's layout: models--ORG--NAME/{refs/<name>: commit, snapshots/<commit>/...};
    the snapshot's files link to the checkpoint's (the cache links them into blobs/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).symlink_to(file)
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_CACHE with org/tiny: main -> the qwen2_5_vl checkpoint, v2 -> the qwen2_vl one; offline."""
    cache = tmp_path / "hub"
    add_snapshot(cache, "org/tiny", MAIN, checkpoints["qwen2_5_vl"], "main")
    add_snapshot(cache, "org/tiny", V2, checkpoints["qwen2_vl"], "v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every snapshot_download that may reach the network (none may)."""
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id: str, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        calls.append(kwargs)
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    return calls


def greedy_ids(llm: LLM) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


def test_llm_generates_from_a_hub_id(cache, checkpoints, downloads):
    with LLM("org/tiny") as from_hub:
        ids = greedy_ids(from_hub)
    with LLM(str(checkpoints["qwen2_5_vl"])) as from_dir:
        assert ids == greedy_ids(from_dir)
    assert not downloads


def test_revision_picks_a_snapshot_by_ref_or_commit(cache, downloads):
    snapshots = cache / "models--org--tiny" / "snapshots"
    assert Path(resolve_model("org/tiny")) == snapshots / MAIN
    assert Path(resolve_model("org/tiny", "main")) == snapshots / MAIN
    assert Path(resolve_model("org/tiny", "v2")) == snapshots / V2
    assert Path(resolve_model("org/tiny", V2)) == snapshots / V2
    resolved = EngineArgs("org/tiny", revision="v2").resolved()
    assert Path(resolved.model) == snapshots / V2
    assert json.loads((Path(resolved.model) / "config.json").read_text())["model_type"] == "qwen2_vl"
    assert not downloads


def test_hf_home_is_honoured(tmp_path, checkpoints, monkeypatch, downloads):
    add_snapshot(tmp_path / "home" / "hub", "org/tiny", MAIN, checkpoints["qwen2_5_vl"], "main")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        Path(resolve_model("org/tiny"))
        == tmp_path / "home" / "hub" / "models--org--tiny" / "snapshots" / MAIN
    )


def test_a_missing_model_fails_in_one_line_without_a_download(cache, downloads):
    with pytest.raises(ModelNotFoundError) as error:
        LLM("org/missing")
    message = str(error.value)
    assert "\n" not in message
    assert "'org/missing'" in message and str(cache) in message and "'main'" in message
    assert "HF_HUB_OFFLINE" in message and str(Path("org/missing").absolute()) in message
    with pytest.raises(ModelNotFoundError, match="'nope'"):
        resolve_model("org/tiny", "nope")
    assert not downloads


def test_a_path_that_is_not_there_is_not_taken_for_a_hub_id(cache, tmp_path, downloads):
    with pytest.raises(ModelNotFoundError, match="not a Hub id") as error:
        resolve_model(str(tmp_path / "no" / "such" / "dir"))
    assert str(tmp_path / "no" / "such" / "dir") in str(error.value)
    assert not downloads


def test_a_local_directory_is_taken_as_it_is(cache, checkpoints, downloads):
    local = str(checkpoints["qwen2_vl"])
    assert resolve_model(local, "v2") == local
    assert EngineArgs(local).resolved() == EngineArgs(local)


def test_dummy_weights_need_none_in_the_cache(cache, checkpoints, downloads):
    """A snapshot of configs and tokenizer only (what a dummy-weight download fetches)."""
    snapshot = cache / "models--org--configs" / "snapshots" / MAIN
    snapshot.mkdir(parents=True)
    for file in checkpoints["qwen2_5_vl"].glob("*.json"):
        (snapshot / file.name).symlink_to(file)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(MAIN)
    assert EngineArgs("org/configs", load_format="dummy").resolved().model == str(snapshot)
    with pytest.raises(ModelNotFoundError, match=r"lacks .*safetensors"):
        resolve_model("org/configs")
    assert not downloads


def test_online_a_model_not_in_the_cache_is_downloaded(tmp_path, checkpoints, monkeypatch):
    """What is asked of the Hub (configs, tokenizer, template, and weights unless dummy), with
    a stand-in for the download that fills the cache as huggingface_hub would."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    asked: list[dict] = []

    def download(repo_id: str, **kwargs) -> str:
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        asked.append(kwargs)
        commit = MAIN if len(asked) == 1 else V2
        return str(add_snapshot(Path(kwargs["cache_dir"]), repo_id, commit, checkpoints["qwen2_5_vl"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    path = resolve_model("org/remote", "v1")
    assert Path(path) == tmp_path / "hub" / "models--org--remote" / "snapshots" / MAIN
    assert asked[0]["revision"] == "v1" and Path(asked[0]["cache_dir"]) == tmp_path / "hub"
    assert "*.safetensors" in asked[0]["allow_patterns"] and "*.json" in asked[0]["allow_patterns"]
    resolve_model("org/remote2", weights=False)
    assert "*.safetensors" not in asked[1]["allow_patterns"] and "*.jinja" in asked[1]["allow_patterns"]
