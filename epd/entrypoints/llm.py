"""Offline inference in the shape of vLLM's `LLM`: `generate`, `chat`, `shutdown`.

from epd import LLM, SamplingParams
with LLM(model="path/to/Qwen2.5-VL", device="cpu") as llm:
    out = llm.chat([{"role": "user", "content": [...]}], SamplingParams(temperature=0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from epd.cluster.layout import Layout
from epd.entrypoints.async_engine import EngineArgs
from epd.entrypoints.backend import EngineBackend
from epd.inputs.processor import InputLimits, InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str,
        *,
        layout: str = "1EPD",
        device: str = "cpu",
        devices: str | Sequence[str] | None = None,
        transfer: str = "auto",
        kv_streaming: str = "auto",
        dtype: str = "float32",
        load_format: str = "safetensors",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int = 1 << 30,
        gpu_memory_utilization: float | None = None,
        mm_cache_bytes: int = 256 << 20,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_images_per_request: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        cuda_graphs: bool | None = None,
    ) -> None:
        """`layout` as in `1EPD`, `2EP+1D`, `1E+1P+1D` (see epd.cluster.layout); `devices`
        (default: `device` for every instance) assigns devices to instances in order;
        `transfer` picks the connector between instance processes (`cuda_ipc`, `shm`, `tcp`;
        `auto`: cuda_ipc when every instance is on a CUDA device, else shm); `kv_streaming`
        (`layer`, `request`, `auto`) whether a prefill instance sends KV layer by layer.
        `gpu_memory_utilization` (CUDA only): the KV cache gets that share of each instance's
        device memory less its weights and activation peak, instead of `kv_cache_memory_bytes`.
        A single aggregated instance (`1EPD`) runs in this process; any other layout
        starts one process per instance (so scripts need `if __name__ == "__main__":`)."""
        args = EngineArgs(
            model=model,
            layout=layout,
            device=device,
            devices=",".join(devices) if isinstance(devices, (list, tuple)) else devices,
            transfer=transfer,
            kv_streaming=kv_streaming,
            dtype=dtype,
            load_format=load_format,
            max_model_len=max_model_len,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            mm_cache_bytes=mm_cache_bytes,
            enable_prefix_caching=enable_prefix_caching,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            limits=InputLimits(max_images_per_request=max_images_per_request),
        )
        self.layout = Layout.parse(layout)
        self.processor = InputProcessor.from_pretrained(model, limits=args.limits)
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
                engine.add_request(request_id, prompt, p)
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
