"""IRP over a video's frames: a video's temporal groups encoded in chunks on several encoders.

First the claim it rests on, for the three Qwen families (Qwen3-VL's deepstack levels included):
encoding temporal groups apart and joining the rows gives the embeddings of the whole grid, in our
towers and in transformers'. Then the cluster: in 2E+1P+1D and 3E+1P+1D a video's chunks go to
different encoders (their own lifetime events and stats say so), P joins them, and the tokens are
transformers' (CPU fp32 greedy, the reference helpers of tests/models/test_video_vs_hf.py); the
same video again is a whole-video hit on P, whatever the split was.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from router_harness import arrived, make_core, prompt

from epd import LLM, SamplingParams
from epd.clock import VirtualClock
from epd.cluster.instance import InstanceConfig, InstanceCore, ListOutbox
from epd.cluster.instance.video_assembly import VideoAssembly, covering_chain
from epd.cluster.layout import Layout
from epd.cluster.messages import (
    EmbeddingsLost,
    EncodeDone,
    EncodeTask,
    NeedEmbeddings,
    PrefillTask,
    ReleaseEmbedding,
    RequestUpdate,
)
from epd.cluster.router.encode_units import CHUNK_STRIDE, encode_units, work_item
from epd.cluster.router.lifecycle import Stage
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.types import ImageInput
from epd.inputs.video_chunks import VideoChunk, item_key, parse_chunk_key, split_groups
from epd.lifetime import Event
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.testing.checkpoints import PREPROCESSOR, QWEN3_PREPROCESSOR, build_tiny_checkpoint
from epd.testing.reference import load_hf_model
from epd.testing.videos import encode_video, noise_clip
from epd.transfer.base import Received, create_connector

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from test_video_vs_hf import FPS, GREEDY, assert_matches_hf, clip, video_prompt  # noqa: E402

STATS_WAIT_S = 30.0  # a hang's bound, not a speed: instances report stats every 0.25 s


# ---- keys, splits, joins ----------------------------------------------------------------------


def test_split_groups_whole_groups_as_equal_as_can_be():
    assert split_groups(8, 2) == [(0, 4), (4, 8)]
    assert split_groups(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert split_groups(2, 5) == [(0, 1), (1, 2)]  # never an empty chunk
    assert split_groups(5, 1) == [(0, 5)]


def test_chunk_key_names_the_video_and_its_groups():
    chunk = VideoChunk("b3:abc", 2, 5, 8)
    assert chunk.key == "b3:abc#groups=2-5/8"
    assert parse_chunk_key(chunk.key) == chunk and item_key(chunk.key) == "b3:abc"
    assert parse_chunk_key("b3:abc") is None and item_key("b3:abc") == "b3:abc"


def test_units_cut_only_videos_and_name_chunks_apart():
    video = torch.arange(4 * 2 * 2 * 3, dtype=torch.uint8).view(16, 3)
    images = [
        ImageInput(None, (1, 2, 2), "img", raw_patches=torch.zeros(4, 3, dtype=torch.uint8)),
        ImageInput(None, (4, 2, 2), "vid", raw_patches=video, modality="video"),
    ]
    units = encode_units(images, [0, 1], parts=3)
    assert [(u.index, u.key, u.num_patches) for u in units] == [
        (0, "img", 4),
        (1, "vid#groups=0-2/4", 8),
        (1, "vid#groups=2-3/4", 4),
        (1, "vid#groups=3-4/4", 4),
    ]
    assert bytes(units[2].item.pixels) == video[8:12].numpy().tobytes()  # its own rows only
    assert units[2].item.grid == (1, 2, 2)
    assert [u.work_item for u in units] == [0, 2 * CHUNK_STRIDE, 2 * CHUNK_STRIDE + 2, 2 * CHUNK_STRIDE + 3]
    assert work_item(1, "vid") == 1
    assert [u.key for u in encode_units(images, [1], parts=1)] == ["vid"]  # one encoder: whole


def test_assembly_joins_in_group_order_across_two_splits():
    rows = torch.arange(8.0).view(8, 1)  # 2 rows per group, 4 groups
    assembly = VideoAssembly()
    assert assembly.add(VideoChunk("v", 2, 4, 4), rows[4:8]) is None
    assert assembly.add(VideoChunk("v", 0, 1, 4), rows[0:2]) is None  # another split's chunk
    assert "v" in assembly
    joined = assembly.add(VideoChunk("v", 1, 2, 4), rows[2:4])
    assert torch.equal(joined, rows) and "v" not in assembly and len(assembly) == 0
    assert covering_chain({(0, 2): rows, (1, 4): rows}, 4) is None


# ---- the router: chunks go to different encoders, the view counts the video ---------------------


def video(content_hash: str, groups: int = 4) -> ImageInput:
    """A video of `groups` temporal groups of 2x2 patches (one token each after the merge)."""
    raw = torch.arange(groups * 4 * 6, dtype=torch.uint8).view(groups * 4, 6)
    return ImageInput(None, (groups, 2, 2), content_hash, raw_patches=raw, modality="video")


def test_router_sends_a_videos_chunks_to_two_encoders_and_counts_them_as_the_video():
    core, fake, _ = make_core("2E+1P+1D")
    sent = core.add_request("r", prompt(8, [video("v")]), SamplingParams(max_tokens=1))
    tasks = {o.instance: o.message for o in sent if isinstance(o.message, EncodeTask)}
    assert {name: [i.content_hash for i in t.items] for name, t in tasks.items()} == {
        "E0": ["v#groups=0-2/4"],
        "E1": ["v#groups=2-4/4"],
    }
    assert core.held.holds("P0", "v") and core.stats["video_chunks"] == 2
    done = EncodeDone("E0", "r", [0], [], [], ["v#groups=0-2/4"])
    core.handle(done)
    assert core.requests["r"].stage is Stage.ENCODING, "E1's chunk is still out"
    # P reports each chunk's arrival: its encoder releases that chunk's entry.
    out = core.handle(arrived("P0", "v#groups=0-2/4", "E0", []))
    assert [(o.instance, o.message) for o in out] == [("E0", ReleaseEmbedding("v#groups=0-2/4", "data://P0"))]
    # E1 dies with its chunk on the way: P hears that the video will not come, and asks again.
    fake.kill("E1")
    out = core.tick()
    assert ("P0", EmbeddingsLost(["v"])) in [(o.instance, o.message) for o in out]
    out = core.handle(NeedEmbeddings("P0", "r", [0]))
    [again] = [o for o in out if isinstance(o.message, EncodeTask)]
    assert again.instance == "E0"
    assert [i.content_hash for i in again.message.items] == ["v"], "one encoder left: sent whole"


# ---- P joins the chunks ------------------------------------------------------------------------


@pytest.fixture
def prefill(checkpoints) -> Iterator[tuple[InstanceCore, ListOutbox]]:
    """PD0 of 2E+1PD (it decodes too: no hand-off to wire), MM cache room for 32 tokens."""
    model = str(checkpoints["qwen2_5_vl"])
    engine = EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()
    hidden = engine.model.hf.text.hidden_size
    spec = next(s for s in Layout.parse("2E+1PD").instances("cpu") if s.name == "PD0")
    cfg = InstanceConfig(spec, engine, "inproc://no-router", "shm", mm_cache_bytes=32 * hidden * 4)
    with create_connector("shm", device="cpu") as connector:
        outbox = ListOutbox()
        yield InstanceCore(cfg, connector, outbox, VirtualClock()), outbox


def video_task(request_id: str, encoding: list[int]) -> PrefillTask:
    """3 text tokens, then a video of 4 temporal groups of 2 tokens."""
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    return PrefillTask(
        request_id, list(range(1, 12)), [(3, 8)], ["v"], [(4, 2, 4)], params, 0.0, None, encoding=encoding
    )


def send_chunk(core: InstanceCore, first: int, end: int, source: str = "shm://E0") -> torch.Tensor:
    """Groups [first, end) of video "v" as an encoder sends them: row i holds i."""
    hidden = core.mm_cache.hidden_size
    rows = torch.arange(2 * first, 2 * end, dtype=torch.float32)[:, None].expand(-1, hidden).contiguous()
    key = VideoChunk("v", first, end, 4).key
    meta = {"content_hash": key, "source": source}
    core.on_transfer(Received(f"mm:{key}", {"embeds": rows}, meta, rows.nbytes, 0.0))
    return rows


def test_p_joins_chunks_in_group_order_and_admits_once_all_are_in(prefill):
    core, outbox = prefill
    core.on_message(video_task("a", encoding=[0]))
    last = send_chunk(core, 2, 4, "shm://E1")  # the later chunk first: encoders race
    assert [m.content_hash for m in outbox.take()] == ["v#groups=2-4/4"]
    assert core.prefill.is_waiting("a") and "v" not in core.mm_cache
    first = send_chunk(core, 0, 2)
    [report] = outbox.take()
    assert report.content_hash == "v#groups=0-2/4" and [rid for rid, _ in report.events] == ["a"]
    assert torch.equal(core.mm_cache.get("v"), torch.cat([first, last]))
    assert not core.prefill.is_waiting("a") and not core.prefill.announced and len(core.prefill.assembly) == 0
    core.step()
    assert any(isinstance(m, RequestUpdate) and m.new_token_ids for m in outbox.take())
    # A chunk sent again after the video was joined (its encoder was thought lost): nothing kept.
    send_chunk(core, 2, 4, "shm://E1")
    assert [m.content_hash for m in outbox.take()] == ["v#groups=2-4/4"] and len(core.prefill.assembly) == 0


def test_a_lost_chunk_drops_the_others_and_the_video_is_asked_for_again(prefill):
    core, outbox = prefill
    core.on_message(video_task("a", encoding=[0]))
    send_chunk(core, 0, 2)
    outbox.take()
    core.on_message(EmbeddingsLost(["v"]))  # the encoder of [2, 4) died
    assert outbox.take() == [NeedEmbeddings("PD0", "a", [0])]
    assert len(core.prefill.assembly) == 0, "all its chunks come again"
    for first, end in ((0, 1), (1, 3), (3, 4)):  # asked again of three encoders: another split
        send_chunk(core, first, end)
    outbox.take()
    assert torch.equal(core.mm_cache.get("v")[:, 0], torch.arange(8.0))
    assert not core.prefill.is_waiting("a")


# ---- the claim: temporal groups encode alike apart and together --------------------------------


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "qwen3_vl", "qwen3_vl")


def hf_video_rows(hf, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """transformers' embeddings of one video; Qwen3-VL's deepstack levels after the main ones, as
    our tower lays them out."""
    out = hf.model.get_video_features(pixels, torch.tensor([grid]))
    levels = getattr(out, "deepstack_features", None) or []
    return torch.cat([out.pooler_output[0], *[level[0] for level in levels]], dim=1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.inference_mode()
def test_temporal_chunks_encode_as_the_whole_grid(request, family):
    path = request.getfixturevalue("qwen3_checkpoint" if family == "qwen3_vl" else "checkpoints")
    model_dir = path if family == "qwen3_vl" else path[family]
    pre = QWEN3_PREPROCESSOR if family == "qwen3_vl" else PREPROCESSOR
    # 12 patches wide: Qwen2.5-VL's 2x2-group windows cut each frame in 3 columns of windows.
    t, h, w = 5, 8, 12
    per_group = h * w
    pixels = torch.randn(t * per_group, 3 * pre["temporal_patch_size"] * pre["patch_size"] ** 2)
    ours = build_model(model_dir, parts=frozenset({VISION}))
    whole = ours.encode_images(pixels, [(t, h, w)])[0]
    for spans in ([(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)]):
        chunks = [
            ours.encode_images(pixels[a * per_group : b * per_group], [(b - a, h, w)])[0] for a, b in spans
        ]
        assert torch.equal(torch.cat(chunks), whole), spans
    hf = load_hf_model(model_dir)
    reference = hf_video_rows(hf, pixels, (t, h, w))
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-4)
    spans = [(0, 2), (2, 5)]
    hf_chunks = [hf_video_rows(hf, pixels[a * per_group : b * per_group], (b - a, h, w)) for a, b in spans]
    assert torch.equal(torch.cat(hf_chunks), reference)


# ---- the cluster -------------------------------------------------------------------------------


def encoders_of(output, item: int = 0) -> set[str]:
    return {e.instance for e in output.metrics.events if e.event is Event.ENCODE_START and e.item == item}


def wait_for_encoded(llm: LLM, counts: dict[str, float]) -> None:
    """Until each encoder's own stats report says it encoded `counts[name]` items (chunks)."""
    router = llm.engine.router
    deadline = time.monotonic() + STATS_WAIT_S
    while any(router.instance_stats.get(n, {}).get("images_encoded_total") != c for n, c in counts.items()):
        assert time.monotonic() < deadline, {n: router.instance_stats.get(n) for n in counts}
        router.poll(100)


def video_request(text: str, frames, fps: float = FPS) -> dict:
    return {"prompt": video_prompt(text), "multi_modal_data": {"video": (frames, {"fps": fps})}}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_video_chunks_on_two_encoders_match_transformers(checkpoint, family):
    frames = clip(16, seed=7)  # 8 temporal groups: a chunk of 4 on each encoder
    # Texts long enough to take the positions past the video's time rows (Qwen2.5-VL's reach 18
    # here): transformers' generate goes on from the prompt's last position, not from one past the
    # largest as its own rope_deltas (and epd) do, so a shorter tail would test that gap instead.
    first = video_request("What happens in this clip, from the first frame to the last?", frames)
    again = video_request("And what happens after that, at the very end of it?", frames)
    with LLM(str(checkpoint), layout="2E+1P+1D") as llm:
        [item] = llm.processor.process_prompt(first).images
        assert item.grid_thw == (8, 4, 6)
        [out] = llm.generate([first], GREEDY, use_tqdm=False)
        assert out.error is None and encoders_of(out) == {"E0", "E1"}
        stats = llm.engine.router.stats
        assert (stats["video_chunks"], stats["encode_items"]) == (2, 2)
        wait_for_encoded(llm, {"E0": 1, "E1": 1})  # each encoder's own count: one chunk each
        # The same video again: P holds it whole (joined), whatever the split: nothing encoded.
        [out_again] = llm.generate([again], GREEDY, use_tqdm=False)
        assert out_again.error is None and encoders_of(out_again) == set()
        assert (stats["video_chunks"], stats["encode_items"]) == (2, 2)
        hf = load_hf_model(checkpoint)
        assert_matches_hf(llm, hf, [first, again], [out, out_again])


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_uneven_chunks_on_three_encoders_from_frames_and_from_a_file(checkpoint):
    """4 temporal groups over 3 encoders: chunks of 2, 1 and 1 groups. The file's chunks are
    decoded by their encoders, each taking its own frames of the (lossless) file."""
    pytest.importorskip("av")
    frames = video_request("What moves?", clip(8, seed=8))
    data = encode_video(noise_clip(16, seed=9), fps=4)  # sampled at 2 fps: 8 frames, 1 s a group
    from_file = {"prompt": video_prompt("Describe it."), "multi_modal_data": {"video": data}}
    with LLM(str(checkpoint), layout="3E+1P+1D") as llm:
        assert [i.grid_thw for i in llm.processor.process_prompt(from_file).images] == [(4, 4, 6)]
        outputs = llm.generate([frames, from_file], GREEDY, use_tqdm=False)
        assert all(out.error is None for out in outputs)
        assert [encoders_of(out) for out in outputs] == [{"E0", "E1", "E2"}] * 2
        assert llm.engine.router.stats["video_chunks"] == 6
        wait_for_encoded(llm, {"E0": 2, "E1": 2, "E2": 2})
        hf = load_hf_model(checkpoint)
        assert_matches_hf(llm, hf, [frames], outputs[:1])
        assert_matches_hf(llm, hf, [from_file], outputs[1:], seconds=1.0)
