"""Offline inference in the shape of vLLM's `LLM`: `generate`, `chat`, `shutdown`; and the
instances' roles: `instances`, `set_roles` (what /admin/instances does online).

from epd import LLM, SamplingParams
with LLM(model="path/to/Qwen2.5-VL", device="cpu") as llm:
    out = llm.chat([{"role": "user", "content": [...]}], SamplingParams(temperature=0))
"""

from __future__ import annotations

import difflib
import inspect
import itertools
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields, replace
from typing import Any

from tqdm.auto import tqdm

from epd.cluster.layout import Layout
from epd.entrypoints.backend import EngineBackend, role_control
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputLimits, InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str, **options: Any) -> None:
        """`options`: the engine options by name, each declared once with its default and help
        as a field of `EngineArgs` (epd/entrypoints/options.py; `epd serve --help` lists the
        same ones as flags). Two conveniences besides: `devices` may be a list, and
        `max_images_per_request` caps the images of one prompt (it goes into `limits`).

        `model`: a model directory, or a Hub id ("Qwen/Qwen2.5-VL-3B-Instruct", at `revision`)
        read from the Hub cache or downloaded into it (epd/models/hub.py).

        A single aggregated instance (`1EPD`) runs in this process; any other layout
        starts one process per instance (so scripts need `if __name__ == "__main__":`)."""
        args = engine_args_for(model, **options).resolved()  # a Hub id: its local snapshot
        self.layout = Layout.parse(args.layout)
        self.processor = InputProcessor.from_pretrained(args.model, limits=args.limits)
        self.engine: EngineBackend | None = args.build(self.processor)
        self._ids = itertools.count()

    # ---- public API ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts: a str, token ids, `{"prompt": ..., "multi_modal_data": {"image": [...]}}`, or a list."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        processed = [self.processor.process_prompt(p) for p in prompts]
        return self._run(processed, sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations; one output each."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        processed = [
            self.processor.process_chat(c, add_generation_prompt=add_generation_prompt) for c in conversations
        ]
        return self._run(processed, sampling_params, use_tqdm)

    def get_tokenizer(self):
        return self.processor.tokenizer

    def instances(self) -> list[dict]:
        """Every instance as {"id", "roles" ("PD"), "device", "state" (up, draining, switching, down)}."""
        return role_control(self._engine()).instances()

    def set_roles(self, instance: str, roles: str) -> dict:
        """Switch `instance` ("P1") to `roles` ("D"): it drains, reconfigures and rejoins before this
        returns the switch's record, with seconds per phase in "timings" (and "error" if it failed).
        A SwitchError (epd.cluster.router.role_switch) names what cannot be switched and why."""
        engine = self._engine()
        done: list[dict] = []
        role_control(engine).set_roles(instance, roles, done.append)
        while not done:
            engine.step()  # between generate calls no request of ours runs: no output to keep
        return done[0]

    def shutdown(self) -> None:
        """Release the engine (model weights and KV cache) and stop every instance process. Idempotent."""
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- internals ----------------------------------------------------------------------------

    def _run(self, prompts: list[ProcessedPrompt], params: Any, use_tqdm: bool) -> list[RequestOutput]:
        engine = self._engine()
        param_list = _per_prompt_params(params, len(prompts))
        ids = [str(next(self._ids)) for _ in prompts]
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, param_list):
                engine.add_request(request_id, engine.prepare_images(prompt), p)
                added.append(request_id)
            return self._drain(engine, ids, use_tqdm)
        except BaseException:
            for request_id in added:
                engine.abort_request(request_id)
            raise

    @staticmethod
    def _drain(engine: EngineBackend, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
        while len(finished) < len(ids):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]

    def _engine(self) -> EngineBackend:
        if self.engine is None:
            raise RuntimeError("this LLM was shut down")
        return self.engine


def _init_signature() -> inspect.Signature:
    """`(self, model, *, <each EngineArgs field with its default>, max_images_per_request)`:
    what help(LLM), IDEs and `inspect.signature(LLM)` show, though `__init__` takes `**options`."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fixed = [inspect.Parameter("self", positional), inspect.Parameter("model", positional, annotation="str")]
    options = [_keyword(f.name, _default_of(f), f.type) for f in fields(EngineArgs) if f.name != "model"]
    convenience = _keyword("max_images_per_request", None, "int | None")
    return inspect.Signature([*fixed, *options, convenience], return_annotation="None")


def _keyword(name: str, default: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


LLM.__init__.__signature__ = _init_signature()  # type: ignore[attr-defined]
# What LLM() accepts, read off the signature it shows so that the two cannot disagree.
_OPTION_NAMES = [p.name for p in LLM.__init__.__signature__.parameters.values() if p.kind is p.KEYWORD_ONLY]


def engine_args_for(model: str, **options: Any) -> EngineArgs:
    """`LLM(model, **options)`'s EngineArgs; an unknown option is a TypeError naming it."""
    _check_option_names(options)
    devices = options.get("devices")
    if isinstance(devices, (list, tuple)):
        options["devices"] = ",".join(devices)
    max_images = options.pop("max_images_per_request", None)
    if max_images is not None:
        limits = options.get("limits", InputLimits())
        options["limits"] = replace(limits, max_images_per_request=max_images)
    return EngineArgs(model, **options)


def _check_option_names(options: dict[str, Any]) -> None:
    for name in options:
        if name not in _OPTION_NAMES:
            close = difflib.get_close_matches(name, _OPTION_NAMES, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise TypeError(
                f"LLM() got an unknown engine option {name!r}; {hint}"
                "(the options are the fields of EngineArgs, epd/entrypoints/options.py)"
            )


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


def _per_prompt_params(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return params
