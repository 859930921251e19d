"""Tensor parallelism inside one instance (issue 22): an instance spanning several GPUs.

What exists (CPU-tested over gloo; the same calls run over nccl):

| module      | what                                                                            |
|-------------|---------------------------------------------------------------------------------|
| `group`     | `TensorParallelGroup`: rank, world size, all_reduce / all_gather / broadcast     |
| `peer_all_reduce` | small sums in one kernel through peer memory (decode steps), not NCCL's ring |
| `sharding`  | which share of each HF weight a rank holds (the table), heads per rank, the     |
|             | rank's view of the config (what sizes its KV cache)                             |
| `context`   | `building_rank(group)`: the decoder's layers built inside it take a rank's share |
| `linear`    | merged column-parallel (q/k/v, gate/up) and row-parallel (o, down) layers, and  |
|             | the factories `epd.models.qwen2_llm` builds with: the plain layers at degree 1   |
| `build`     | `build_rank_model`: a rank's model, weights cut from the checkpoint or dummy     |
| `parts`     | `instance_parts(group)`: rank 0's engine compute over its workers;               |
|             | `rank_model_parts(group)`: one rank's own (a worker's; an engine per rank)       |
| `runner`    | `ParallelRunner`: rank 0's runner, `ModelRunner`'s interface over every rank     |
| `commands`  | what rank 0 sends its workers (build, a step, KV: gather, inject, send; stop)     |
| `channel`   | how: a shared-memory ring (`ring`), one write for every worker, set up in `join` |
| `worker`    | `build_worker`, `RankWorker.serve`: a worker that only executes                  |
| `kv`        | a request's KV between whole (every kv head) and the ranks' shares              |
| `vision`    | the vision tower split by heads and MLP columns (asked for; replicated otherwise)|
| `encoder`   | an encoder-only instance over ranks: rank 0 drives the split tower everywhere    |
| `lifeline`  | a worker ends when its rank 0 ends, however it ends                              |
| `launch`    | `run_on_ranks`: a function on every rank, spawned (tests, measurements)          |

Degree 1 costs nothing: no group, the single-device layers, one `is None` test per sublayer.
The LM head is split by vocabulary rows (each rank its rows, one all-gather of the logits; a
worker drops what it gathered); replicated: the token embedding, the vision tower (on rank 0
only: workers get image rows, never pixels). CUDA graphs of decode steps at any degree: every
rank captures its share, all-reduces and the head's all-gather included, as it is built
(`parts`), and replays the same padded size at each step. Not yet:
reading only a rank's slice of each checkpoint tensor, role switches that rebuild a
tensor-parallel engine, switchable roles, the Ray launcher (it cannot start workers: such an
instance fails to start). An encoder-only instance of degree > 1 (`1E@tp2`) splits its vision
tower instead (`encoder`, below).

How an instance becomes a group of workers
------------------------------------------
A layout group may end in `@tpN` (`1E+1P@tp2+1D`, epd.cluster.layout); each of its instances
takes N devices in order. The local launcher (epd.cluster.launcher `start_group`) starts the
instance process (rank 0, the first device) and N-1 worker processes (the next devices), which
meet at a file store the launcher picks (`InstanceConfig.tp_init_method`): nccl between GPUs,
gloo on the CPU, plus a gloo side group that sets up the command channel (a shared-memory ring
that rank 0 writes each pickled command into once, epd.parallel.channel). Rank 0 is the instance: its core,
scheduler, block manager, sampler and connectors run there unchanged, over a `ParallelRunner`
(the engine's `model_parts` is `instance_parts(group)`; epd.cluster.instance.shell picks it).
Its first command makes the workers build what rank 0 builds (`BuildRank`: the engine config);
then every runner call sends its command and runs rank 0's share, the workers running theirs:

    rank 0:  engine.step -> runner.run: prepare (requests -> StepInputs, images encoded or read
             from the MM cache) -> send RunStep(StepInputs) [+ broadcast image rows] -> forward -> logits
    worker:  command received -> forward(StepInputs) without logits (same all-reduces)

A pure decode step runs as a CUDA graph on every rank or on none (the runner decides from the
step, which every rank holds alike): rank 0 replays its graph (to the logits), the workers replay
theirs of the same padded size (to the hidden states), and NCCL pairs the captured all-reduces.

The step goes out as the prepared `StepInputs` (flat ids, slots, positions, block tables), not as
a diff of requests: simple, and the workers hold no request state; its cost is O(tokens of the
step) pickled per step, which a diff (new requests in full, running ones as a token each, with
the workers mirroring requests) would cut for long prefills. Block ids index every rank's cache
alike: one block manager, a block count all ranks agreed on (the minimum). Image rows reach the
workers by one broadcast per step. A worker ends when rank 0's process ends (its lifeline: a
pipe whose other end only rank 0 holds), so none outlives a crashed or killed instance; the
launcher reports the group alive only while every rank is.

KV between a tp2 P and a tp1 D (and the reverse): what is built
---------------------------------------------------------------
A prefill instance's hand-offs leave rank 0 off the data path. Each rank's cache is [layers, 2,
blocks, block_size, its kv heads, head_dim]; rank r holds kv piece r * kv_pieces // world
(`sharding.HeadSplit`), a known head range. The runner's `handoff_kv` (and `handoff_kv_layer`
when streaming) returns `kv.HeadShares`: rank 0's piece, and a call that commands each worker
that first holds a piece (`SendKV`, `SendLayer`) to copy its heads out of its own cache and send
them to D through a connector of its own (the instance's kind, on its device: cuda_ipc within a
host), as a part naming its head range (epd.cluster.kv_handoff); D writes each piece into its
head range of the whole KV and starts the request when every piece (of every layer) is in. So n
transfers run in parallel, each 1/n of the KV, and no copy passes through rank 0; request state
(prompt, sampled token, M-RoPE) still travels once, in rank 0's `kv:` message. Rank 0 learns what
became of its workers' sends (failures included, so the router re-places the request) by asking
(`PollSends`, a gather over the side group) while any is outstanding.

    P rank 0:  kvl:<rid>:0 {its heads}  +  kv:<rid> {meta, head_parts}  -->  D (one connector pair)
    P rank 1:  kvl:<rid>:1 {its heads}  ----------------------------------->  D (another pair)
    D:         whole[..., start:end, :] = piece, per part; when all are in: inject, decode

The rest stays whole, every kv head, as at degree 1 (`epd.parallel.kv`):
- `gather_kv` (a swap-out, a migration) gathers the request's KV from every rank to rank 0 (the
  first holder of each kv head when ranks share one);
- `inject_kv` (a hand-off arriving, a swap-in) on rank 0 scatters the rows by kv head, each rank
  writing its heads; so P tp1 -> D tp2 needs nothing on P's side, and tp2 -> tp2 works alike.
  Not built: D's ranks receiving their pieces straight from P's (D tp2 still takes the whole KV
  on rank 0 and scatters it).

The E stage: the vision tower replicated or split
-------------------------------------------------
Replicated (the default: `build_rank_model` builds the whole tower on every rank): an E
instance of degree n is n encoders, each rank encoding its own images (IRP's split by patch
count, no collective), which should win at batch 8; an EPD rank now encodes every image
itself, redundantly (simple; rank r encoding 1/n of them and all-gathering the rows is the fix).
Split (`build_rank_model(..., split_vision=True)`, i.e. `building_rank(group, split_vision=True)`;
the layers are `epd.parallel.vision`'s, built by the Qwen2-VL / Qwen2.5-VL tower's factories):
Megatron on the ViT. Each block holds its rank's heads of the fused qkv (its rows of q, of k and
of v), attn.proj row-parallel, the MLP's fc1 / gate_up by columns and fc2 / down_proj
row-parallel; the two row-parallel layers all-reduce [patches, hidden] themselves and add their
bias once, after the sum. Patch embedding, norms, rotary and merger stay whole. Every rank then
encodes the whole batch together, so it cuts the latency of one large image (batch 1) when the
ViT's width amortizes the all-reduces (Qwen2.5-VL's 1280 wide tower may not; InternViT-6B's 3200
should). Degree 1, and any build without the switch (the LLM's included), gets the plain layers.
Its embeddings equal one device's (tests/parallel/test_tp_vision.py). An encoder-only instance of
degree > 1 (`1E@tp2+1P+1D`) serves with it (epd.parallel.encoder: rank 0's encoder worker calls
the tower, which first has the workers encode the same batch); an EPD or EP instance keeps the
replicated tower on rank 0, which encodes alone. `python -m epd.bench.vision_tp --devices
cuda:0,cuda:1` measures one GPU, replicated and split at sides 448-1344 px and batches 1 and 8
(Qwen2.5-VL-7B's tower splits 2 or 4 ways: 16 heads, 3420 MLP columns), the issue's question.
"""
