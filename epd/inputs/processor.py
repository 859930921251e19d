"""Prompt (text, token ids or chat messages) + images -> `ProcessedPrompt` for the engine.

Prompt shapes accepted by `process_prompt` (vLLM's offline format):

    "text"                                   # no images
    [token ids]                              # no images
    {"prompt": "text", "multi_modal_data": {"image": img | [img, ...]}}
    {"prompt_token_ids": [...], "multi_modal_data": {"image": ..., "video": video | [video, ...]}}

where the prompt holds one `<|image_pad|>` per image (normally inside
`<|vision_start|><|image_pad|><|vision_end|>`), in image order, and one `<|video_pad|>` per
video (the Qwen families; a video: a list of PIL frames, a uint8 array [F, H, W, 3], as
vLLM a (frames, {"fps": ...}) pair, or a video file: epd.inputs.video_sources). Images and
videos become one list of items in prompt order; a video is an item whose grid has t > 1
(epd.inputs.video). A Qwen3-VL video is one item per temporal group instead, each written
after its time and between vision start and end tokens, as Qwen3VLProcessor writes them:

    ids:       [ s  V  D  E  t ]              D = video pad, T0/T1 = "<0.3 seconds>"... as text
    expanded:  [ s  V  T0 V  D  D  E  T1 V  D  D  E  E  t ]     one placeholder per group

Each pad becomes
`image.num_tokens(merge_size)` copies, as Qwen2VLProcessor does by repeating the pad in the
text before tokenising: pads are special tokens, so both give the same ids.

    ids:       [ s  V  I  E  t ]              V/E = vision start/end, I = image pad
    expanded:  [ s  V  I  I  I  I  E  t ]     placeholders = [PlaceholderRange(offset=2, length=4)]

InternVL's prompts hold one `<IMG_CONTEXT>` per image, and InternVLProcessor also writes the
image's start and end tokens around its copies (`VisionTokenIds.image_wrap`):

    ids:       [ s  C  t ]                    C = <IMG_CONTEXT>, < and > = <img> and </img>
    expanded:  [ s  <  C  C  C  C  >  t ]     placeholders = [PlaceholderRange(offset=2, length=4)]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from epd.inputs.cancel import image_loading_cancel_event, stop_if_cancelled
from epd.inputs.chat import ChatTemplate, RenderedChat, load_chat_template
from epd.inputs.errors import InvalidInputError
from epd.inputs.image import (
    FileBuffers,
    ImageSource,
    RemoteFetcher,
    image_key,
    load_image,
    read_image_bytes,
    read_image_header,
)
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw, process_image
from epd.inputs.tokenizer import Tokenizer
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.inputs.video import NO_VIDEO, TimedVideo, VideoOptions, timestamp_text
from epd.inputs.video_sources import load_video, video_options, video_sources

_PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data")


@dataclass(frozen=True)
class InputLimits:
    """What a request may bring. None = unlimited (local paths: allowed anywhere), except
    `remote_fetcher`: None refuses http(s) image URLs; given, it fetches them."""

    max_images_per_request: int | None = None
    allowed_local_media_path: str | None = None
    max_image_pixels: int | None = None
    max_image_bytes: int | None = None
    remote_fetcher: RemoteFetcher | None = None
    max_video_frames: int | None = None


@dataclass(frozen=True)
class VisionTokenIds:
    """The special token ids of the Qwen2-VL prompt format."""

    image_token_id: int
    vision_start_token_id: int | None = None
    video_token_id: int | None = None
    vision_end_token_id: int | None = None  # Qwen3-VL writes it after each temporal group
    # Written around each image's expanded tokens (InternVL's <img>, </img>); None: nothing.
    image_wrap: tuple[int, int] | None = None


class InputProcessor:
    """Turns user prompts and chats into expanded token ids plus processed images.

    Every problem caused by the request raises `InvalidInputError`; the processor keeps no
    per-request state, so one instance serves all requests.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig,
        token_ids: VisionTokenIds,
        chat_template: ChatTemplate | None = None,
        limits: InputLimits = InputLimits(),
        video: VideoOptions = NO_VIDEO,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.token_ids = token_ids
        self.chat_template = chat_template
        self.limits = limits
        self.video = video
        # Where data URLs' files are decoded: memory the encoding instances read (set by the
        # cluster that serves this processor's requests: epd.cluster.shared_files); None: bytes.
        self.file_buffers: FileBuffers | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        image_token_id: int | None = None,
        limits: InputLimits = InputLimits(),
    ) -> InputProcessor:
        """Load tokenizer, preprocessor config and chat template (if any) from a checkpoint directory.

        Token ids come from config.json (top level or `text_config`), falling back to the
        tokenizer's `<|image_pad|>` / `<|vision_start|>` / `<|video_pad|>`; `image_token_id`
        overrides. A checkpoint without a chat template loads, but `process_chat` then refuses.
        """
        tokenizer = Tokenizer.from_pretrained(model_dir)
        token_ids = _read_token_ids(model_dir, tokenizer, image_token_id)
        try:
            template = ChatTemplate(load_chat_template(model_dir), tokenizer.special_tokens)
        except FileNotFoundError:
            template = None
        image_config = ImageProcessorConfig.from_pretrained(model_dir)
        video = video_options(model_dir, limits.max_video_frames)
        return cls(tokenizer, image_config, token_ids, template, limits, video)

    @property
    def merge_size(self) -> int:
        return self.image_config.merge_size

    def process_prompt(self, prompt: Any) -> ProcessedPrompt:
        """Tokenise (unless ids are given), load and process images, expand the image pads.

        The caller writes the whole prompt, markup included (as with vLLM's completions): special
        tokens in the text, `<|im_start|>` or `<|image_pad|>`, are read as control tokens.
        """
        text, ids, sources, videos = _split_prompt(prompt)
        if ids is None:
            ids = self.tokenizer.encode(text)
        else:
            self._check_token_ids(ids)
        return self._build(ids, sources, text, videos)

    def process_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> ProcessedPrompt:
        """Render `messages` with the chat template, then process like a text prompt with its images.

        Only the template writes control tokens: special tokens typed in message text (any role)
        are tokenised as ordinary text, so a message cannot end its turn or forge another.
        """
        if self.chat_template is None:
            raise InvalidInputError("this model has no chat template; send a plain prompt instead")
        chat = self.chat_template.render(messages, add_generation_prompt, **template_kwargs)
        return self._build(self._encode_chat(chat), chat.images, chat.text, chat.videos)

    def _encode_chat(self, chat: RenderedChat) -> list[int]:
        """Token ids of a rendered chat, special tokens counted only where the template wrote them."""
        if chat.message_spans is not None:
            return self.tokenizer.encode_with_literal_spans(chat.text, chat.message_spans)
        # The template rewrote message text, so where it lies is unknown: rather than guess,
        # refuse text that would be read as control tokens.
        for text in chat.message_texts:
            found = self.tokenizer.special_tokens_in(text)
            if found:
                raise InvalidInputError(
                    f"message text contains the special token {found[0]!r}, which this model's chat "
                    "template cannot keep as plain text; remove it"
                )
        return self.tokenizer.encode(chat.text)

    def load_images(self, sources: Sequence[ImageSource]) -> list[ImageInput]:
        """Each image's bytes, checked (limits), keyed and sized from its header, in order.

        No pixel is decoded here: the side that encodes an image makes its patches
        (epd.inputs.patches). A PIL image (offline API) has no file to pass on, so it is
        processed now. Stops between images once the event of `cancel_image_loading_on` is
        set: reading a file or fetching a URL may take long, and a request may bring many.
        """
        lim = self.limits
        cancel = image_loading_cancel_event()
        images = []
        for src in sources:
            stop_if_cancelled(cancel)
            if isinstance(src, Image.Image):
                img = load_image(src, max_image_pixels=lim.max_image_pixels)
                images.append(process_image(img, self.image_config))
                continue
            data = read_image_bytes(
                src,
                allowed_local_media_path=lim.allowed_local_media_path,
                max_image_bytes=lim.max_image_bytes,
                fetch_remote=lim.remote_fetcher,
                buffers=self.file_buffers,
            )
            header = read_image_header(data, max_image_pixels=lim.max_image_pixels)
            grid = image_grid_thw(header.height, header.width, self.image_config)
            images.append(ImageInput(None, grid, image_key(data), encoded=data))
        return images

    def load_videos(self, videos: Sequence[Any]) -> list[ImageInput | TimedVideo]:
        """Each video as one item (grid t > 1), in order. Frames are processed now; a file is
        checked, keyed and sized from its header only, and decoded where it is encoded.
        Qwen3-VL's: their temporal groups with their times (epd.inputs.video.TimedVideo), a
        file's groups each naming the file (decoded where they are encoded, as any file)."""
        items = []
        cancel = image_loading_cancel_event()
        for video in videos:
            stop_if_cancelled(cancel)
            items.append(load_video(video, self.image_config, self.video, self.limits))
        return items

    def _build(
        self, ids: list[int], sources: Sequence[ImageSource], text: str | None, videos: Sequence[Any] = ()
    ) -> ProcessedPrompt:
        # Cheap checks first: refuse before decoding any image.
        if not ids:
            raise InvalidInputError("the prompt is empty")
        self._check_image_count(ids, len(sources))
        self._check_video_count(ids, len(videos))
        images = self.load_images(sources)
        tokens = self.token_ids
        if not videos:
            counts = [img.num_tokens(self.merge_size) for img in images]
            expanded, placeholders = expand_image_tokens(
                ids, tokens.image_token_id, counts, tokens.image_wrap
            )
            return ProcessedPrompt(expanded, images, placeholders, prompt=text)
        clips = [self._video_pieces(clip) for clip in self.load_videos(videos)]
        pads = {tokens.image_token_id: [[Piece(img)] for img in images], tokens.video_token_id: clips}
        expanded, placeholders, items = expand_item_tokens(ids, pads, self.merge_size)
        return ProcessedPrompt(expanded, items, placeholders, prompt=text)

    def _video_pieces(self, clip: ImageInput | TimedVideo) -> list[Piece]:
        """What a video's pad becomes: the item; or, Qwen3-VL, each temporal group after its time
        and between vision start and end tokens (transformers' `Qwen3VLProcessor`)."""
        if not isinstance(clip, TimedVideo):
            return [Piece(clip)]
        start, end = self.token_ids.vision_start_token_id, self.token_ids.vision_end_token_id
        if start is None or end is None:
            raise ValueError("Qwen3-VL video needs the <|vision_start|> and <|vision_end|> token ids")
        return [
            Piece(group, [*self.tokenizer.encode(timestamp_text(seconds)), start], [end])
            for group, seconds in zip(clip.groups, clip.seconds, strict=True)
        ]

    def _check_video_count(self, ids: list[int], num_videos: int) -> None:
        video = self.token_ids.video_token_id
        num_pads = 0 if video is None else ids.count(video)
        if (num_pads or num_videos) and not self.video.supported:
            raise InvalidInputError("this model does not take video input")
        if num_pads != num_videos:
            raise InvalidInputError(
                f"the prompt has {num_pads} video placeholders but {num_videos} videos were given "
                "(write one <|vision_start|><|video_pad|><|vision_end|> per video)"
            )

    def _check_image_count(self, ids: list[int], num_images: int) -> None:
        limit = self.limits.max_images_per_request
        if limit is not None and num_images > limit:
            raise InvalidInputError(f"too many images: {num_images} > limit {limit} per request")
        num_pads = ids.count(self.token_ids.image_token_id)
        if num_pads != num_images:
            placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
            if self.token_ids.image_wrap is not None:
                placeholder = self.tokenizer.id_to_token(self.token_ids.image_token_id)
            raise InvalidInputError(
                f"the prompt has {num_pads} image placeholders but {num_images} images were given "
                f"(write one {placeholder} per image)"
            )

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab = self.tokenizer.vocab_size
        for t in ids:
            if type(t) is not int or not 0 <= t < vocab:
                raise InvalidInputError(f"prompt_token_ids must be integers in [0, {vocab}), got {t!r}")


def expand_image_tokens(
    ids: list[int], image_token_id: int, num_tokens: Sequence[int], wrap: tuple[int, int] | None = None
) -> tuple[list[int], list[PlaceholderRange]]:
    """Replace the i-th `image_token_id` by `num_tokens[i]` copies (between `wrap`'s start and
    end tokens, when given); return new ids and each image's range (the copies only)."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != len(num_tokens):
        raise InvalidInputError(
            f"the prompt has {len(positions)} image placeholders but {len(num_tokens)} images"
        )
    out: list[int] = []
    ranges = []
    prev = 0
    for pos, n in zip(positions, num_tokens, strict=True):
        out.extend(ids[prev:pos])
        if wrap is not None:
            out.append(wrap[0])
        ranges.append(PlaceholderRange(offset=len(out), length=n))
        out.extend([image_token_id] * n)
        if wrap is not None:
            out.append(wrap[1])
        prev = pos + 1
    out.extend(ids[prev:])
    return out, ranges


@dataclass(frozen=True)
class Piece:
    """One item's tokens where a pad stood: `before`, the item's copies of the pad, `after`."""

    item: ImageInput
    before: Sequence[int] = ()
    after: Sequence[int] = ()


def expand_item_tokens(
    ids: list[int], pads: dict[int, Sequence[Sequence[Piece]]], merge_size: int
) -> tuple[list[int], list[PlaceholderRange], list[ImageInput]]:
    """Images and videos together: the k-th pad of each token id in `pads` becomes the k-th
    entry of its list, pieces in order (one for an image or a Qwen2-VL video, one per temporal
    group for a Qwen3-VL video). Returns the new ids, the ranges and the items, in prompt order."""
    queues = {token: list(entries)[::-1] for token, entries in pads.items()}
    out: list[int] = []
    ranges, items = [], []
    for token in ids:
        if token not in queues:
            out.append(token)
            continue
        if not queues[token]:
            raise InvalidInputError("the prompt has more placeholders than items")
        for piece in queues[token].pop():
            out.extend(piece.before)
            n = piece.item.num_tokens(merge_size)
            ranges.append(PlaceholderRange(offset=len(out), length=n))
            items.append(piece.item)
            out.extend([token] * n)
            out.extend(piece.after)
    if any(queues.values()):
        raise InvalidInputError("the prompt has fewer placeholders than items")
    return out, ranges, items


def _split_prompt(prompt: Any) -> tuple[str | None, list[int] | None, list[ImageSource], list[Any]]:
    """(text, token ids, image sources, videos) of a prompt; exactly one of text and ids is set."""
    if isinstance(prompt, str):
        return prompt, None, [], []
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt), [], []
    if not isinstance(prompt, dict):
        raise InvalidInputError(
            f"a prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}"
        )
    unknown = sorted(str(k) for k in prompt if k not in _PROMPT_KEYS)
    if unknown:
        raise InvalidInputError(f"unknown prompt fields {unknown} (expected {', '.join(_PROMPT_KEYS)})")
    text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    if (text is None) == (ids is None):
        raise InvalidInputError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
    if text is not None and not isinstance(text, str):
        raise InvalidInputError("'prompt' must be a string")
    if ids is not None and not isinstance(ids, (list, tuple)):
        raise InvalidInputError("'prompt_token_ids' must be a list of integers")
    mm_data = prompt.get("multi_modal_data")
    return text, None if ids is None else list(ids), _image_sources(mm_data), video_sources(mm_data)


def _image_sources(mm_data: Any) -> list[ImageSource]:
    if mm_data is None:
        return []
    if not isinstance(mm_data, dict):
        raise InvalidInputError("'multi_modal_data' must be a dict like {'image': [...]}")
    other = sorted(str(k) for k in mm_data if k not in ("image", "video"))
    if other:
        raise InvalidInputError(
            f"unsupported multi_modal_data modalities {other}; only 'image' and 'video' are supported"
        )
    images = mm_data.get("image")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _read_token_ids(
    model_dir: str | os.PathLike, tokenizer: Tokenizer, image_token_id: int | None
) -> VisionTokenIds:
    path = os.path.join(model_dir, "config.json")
    config: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    text_config = config.get("text_config") or {}

    def pick(key: str, token: str) -> int | None:
        value = config.get(key, text_config.get(key))
        return value if value is not None else tokenizer.token_to_id(token)

    image_id = image_token_id if image_token_id is not None else pick("image_token_id", "<|image_pad|>")
    if image_id is None:
        raise ValueError(f"cannot find the image token id in {model_dir} (config.json or <|image_pad|>)")
    return VisionTokenIds(
        image_token_id=image_id,
        vision_start_token_id=pick("vision_start_token_id", "<|vision_start|>"),
        video_token_id=pick("video_token_id", "<|video_pad|>"),
        vision_end_token_id=pick("vision_end_token_id", "<|vision_end|>"),
        image_wrap=_image_wrap(model_dir, tokenizer),
    )


def _image_wrap(model_dir: str | os.PathLike, tokenizer: Tokenizer) -> tuple[int, int] | None:
    """The ids of the tokens around each image, where tokenizer_config.json names them
    (`start_image_token`, `end_image_token`: what InternVLProcessor reads), else None."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    names = {**config, **(config.get("extra_special_tokens") or {})}
    start, end = names.get("start_image_token"), names.get("end_image_token")
    if not isinstance(start, str) or not isinstance(end, str):
        return None
    ids = tokenizer.token_to_id(start), tokenizer.token_to_id(end)
    if None in ids:
        raise ValueError(f"tokenizer_config.json names image tokens {start!r}, {end!r} the tokenizer lacks")
    return ids
