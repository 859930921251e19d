"""Image files in shared memory, API process -> the encoders of its host (epd.cluster.shared_files).

What is checked: the arena gives buffers back when their last reference goes (and then has room
again), refuses when full; another process maps it by its path and reads what was written; a file
whose memory was freed and reused fails its read instead of giving another file's bytes; the
router names a file's place instead of sending it only to instances that map the arena, and only
for whole images; and, with real instance processes, data URLs decoded into the arena give the
tokens the in-process engine gives for the same files, bad files included.
"""

from __future__ import annotations

import base64
import gc
import io
import subprocess
import sys

import blake3
import pytest

from epd import LLM, SamplingParams
from epd.cluster.messages import EncodeItem, EncodeTask, decode_for_instance, encode_frames
from epd.cluster.shared_files import ALIGN, SharedFile, SharedFileReader, SharedFiles
from epd.inputs.errors import InvalidInputError
from epd.inputs.image import DataURL
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PARAMS = SamplingParams(temperature=0, max_tokens=6)


def key(data: bytes) -> str:
    return "b3:" + blake3.blake3(data).hexdigest()


def written(files: SharedFiles, data: bytes) -> memoryview:
    buffer = files.take(len(data))
    assert buffer is not None
    buffer[:] = data
    return buffer


def test_buffers_are_freed_with_their_last_reference_and_their_room_is_reused():
    files = SharedFiles(4 * ALIGN)
    first, second = written(files, b"a" * ALIGN), written(files, b"b" * 2 * ALIGN)
    assert files.used == 3 * ALIGN
    assert files.take(2 * ALIGN) is None and files.refused == 1  # one line of 64 bytes is left
    piece = first[10:20]  # a slice keeps its buffer's memory
    del first
    gc.collect()
    assert files.used == 3 * ALIGN and bytes(piece) == b"a" * 10
    del piece, second
    gc.collect()
    assert files.used == 0
    whole = files.take(4 * ALIGN)  # the freed pieces joined again: the whole arena in one
    assert whole is not None and files.locate(whole) == (ALIGN, 4 * ALIGN)  # after the token's line


def test_locate_names_the_place_of_a_buffer_or_a_slice_and_nothing_else():
    files, other = SharedFiles(1 << 16), SharedFiles(1 << 16)
    written(files, b"x" * 100)  # freed at once: its room is taken again below
    first, second = written(files, b"1" * 100), written(files, b"2" * 300)
    assert files.locate(first) == (ALIGN, 100)  # the first line holds the arena's token
    assert files.locate(second) == (3 * ALIGN, 300)
    assert files.locate(second[5:50]) == (3 * ALIGN + 5, 45)
    assert files.locate(bytes(second)) is None
    assert files.locate(memoryview(bytearray(300))) is None
    assert other.locate(second) is None


def test_another_process_maps_the_arena_by_its_path_and_reads_a_file():
    files = SharedFiles(1 << 20)
    data = bytes(range(256)) * 40
    written(files, b"-" * 1000)
    buffer = written(files, data)
    offset, length = files.locate(buffer)
    code = (
        "import sys; from epd.cluster.shared_files import SharedFileReader;"
        f"r = SharedFileReader.open(({files.path!r}, {files.token!r}));"
        f"sys.stdout.buffer.write(r.file({offset}, {length}, {key(data)!r}).read())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout == data
    assert SharedFileReader.open(("/proc/self/fd/987654", files.token)) is None  # nothing there
    assert SharedFileReader.open(None) is None
    # The path names another file (on another host, another process may have this pid and fd).
    other = SharedFiles(1 << 16)
    assert SharedFileReader.open((other.path, files.token)) is None


def test_a_file_whose_memory_was_reused_fails_its_read():
    files = SharedFiles(1 << 16)
    reader = SharedFileReader(files.path, files.token)
    data = b"first file " * 50
    buffer = written(files, data)
    offset, length = files.locate(buffer)
    late = reader.file(offset, length, key(data))  # an encoder that has not read it yet
    assert late.read() == data
    del buffer
    gc.collect()
    reused = written(files, b"second file" * 50)  # another request's file, same place
    assert files.locate(reused)[0] == offset
    with pytest.raises(InvalidInputError, match="released before this encoder read it"):
        late.read()
    with pytest.raises(ValueError, match="outside"):
        reader.file(offset, 1 << 17, key(data))


def item(index: int, file: bytes | memoryview, **fields) -> EncodeItem:
    return EncodeItem(index, key(bytes(file)), (1, 4, 4), b"", 0, file, **fields)


def test_the_router_names_shared_files_only_to_readers_and_only_whole_images():
    files = SharedFiles(1 << 20)
    image, chunk_file, heap = written(files, b"png" * 100), written(files, b"mp4" * 100), b"jpg" * 100
    task = EncodeTask(
        "r0",
        [item(0, image), item(1, chunk_file, groups=(0, 1)), item(2, heap), item(3, image)],
        "tcp://p0",
    )
    reader = SharedFileReader(files.path, files.token)

    frames = encode_frames(task, files)
    # The message, then the video chunk's file and the heap file: the shared image is named, not sent.
    assert [bytes(f) for f in frames[1:]] == [b"mp4" * 100, heap]
    received = decode_for_instance([bytes(f) for f in frames], reader)
    first, chunk, plain, again = received.items
    assert isinstance(first.file, SharedFile) and first.file.read() == b"png" * 100
    assert again.file is first.file  # one file carried by two items: read once
    assert bytes(chunk.file) == b"mp4" * 100 and plain.file == heap

    as_frames = encode_frames(task)  # an instance that does not map the arena
    assert [bytes(f) for f in as_frames[1:]] == [b"png" * 100, b"mp4" * 100, heap]
    with pytest.raises(ValueError, match="does not map"):
        decode_for_instance([bytes(f) for f in frames], None)


def png(seed: int, width: int = 120, height: int = 90) -> bytes:
    out = io.BytesIO()
    noise_image(width, height, seed=seed).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, wrap: bool = False) -> DataURL:
    text = base64.b64encode(data)
    if wrap:  # line breaks: not strict base64, decoded the lenient way into new bytes
        text = b"\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return DataURL("image/png", memoryview(text), json_escapes=True)


def prompt(*images) -> dict:
    body = f"<|im_start|>user\n{IMAGE * len(images)}what is this<|im_end|>\n<|im_start|>assistant\n"
    return {"prompt": body, "multi_modal_data": {"image": list(images)}}


def test_data_urls_decoded_into_shared_memory_give_the_in_process_tokens(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    files = [png(1), png(2, 60, 200), png(3)]
    broken = png(4)[:600]  # its header whole, its pixels cut: fails where it is decoded
    with LLM(model) as llm:
        reference = llm.generate([prompt(files[0]), prompt(files[1], files[2])], PARAMS, use_tqdm=False)
    requests = [
        prompt(data_url(files[0])),
        prompt(data_url(broken)),
        prompt(data_url(files[1]), data_url(files[2], wrap=True)),
    ]
    with LLM(model, layout="1E+1P+1D") as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
        shared = llm.engine.shared_files
        taken = shared.taken
    assert outputs[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert outputs[2].outputs[0].token_ids == reference[1].outputs[0].token_ids
    assert outputs[1].error is not None and "truncated or corrupt" in outputs[1].error
    # Four buffers: one per file, the wrapped one's given back when strict decoding refused it.
    assert taken == 4
    gc.collect()
    assert shared.used == 0  # every request ended: all given back
