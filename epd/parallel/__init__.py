"""Tensor parallelism inside one instance (issue 22): an instance spanning several GPUs.

What exists (CPU-tested over gloo; the same calls run over nccl):

| module      | what                                                                            |
|-------------|---------------------------------------------------------------------------------|
| `group`     | `TensorParallelGroup`: rank, world size, all_reduce / all_gather / broadcast     |
| `sharding`  | which share of each HF weight a rank holds (the table), heads per rank, the     |
|             | rank's view of the config (what sizes its KV cache)                             |
| `context`   | `building_rank(group)`: the decoder's layers built inside it take a rank's share |
| `linear`    | merged column-parallel (q/k/v, gate/up) and row-parallel (o, down) layers, and  |
|             | the factories `epd.models.qwen2_llm` builds with: the plain layers at degree 1   |
| `build`     | `build_rank_model`: a rank's model, weights cut from the checkpoint or dummy     |
| `parts`     | `rank_model_parts(group)`: an `LLMEngine` on one rank                            |
| `launch`    | `run_on_ranks`: a function on every rank, spawned (tests, measurements)          |

Degree 1 costs nothing: no group, the single-device layers, one `is None` test per sublayer.
Replicated for now: token embedding and lm_head (every rank computes the full logits), the
vision tower. Not yet: CUDA graphs at degree > 1 (refused), reading only a rank's slice of
each checkpoint tensor, layouts (`1E+1P@tp2+1D`), the launcher and the cluster.

How an instance becomes a group of workers (next increment)
------------------------------------------------------------
The launcher starts, per tensor-parallel instance, its instance process (rank 0, cuda:i) and
world - 1 worker processes (ranks 1.., the next devices in order), all joining one group at an
init method the launcher picks (`tcp://host:port`). Rank 0 is the instance: its core, scheduler,
block manager, sampler and connectors run there, unchanged, over a runner that is now a
`ParallelRunner` façade. Each step it sends the workers the step's batch as a diff (new
requests in full: prompt ids, M-RoPE positions, image rows; running ones as deltas: new tokens,
new block ids), broadcast on a CPU side channel (gloo or shm; `broadcast_object` for a start),
then runs its own share; every rank builds the same batch tensors and runs the same forward,
the all-reduces keeping them in step. Only rank 0 computes logits and samples (the others skip
`compute_logits`). Block ids index every rank's cache alike: one block manager, a block count
all ranks agreed on (`parts`: the minimum). Image embeddings must reach every rank (they
become inputs_embeds rows on each): an E instance's connector sends them to every rank of a P,
or rank 0 broadcasts the rows of the step over nccl. CUDA graphs per rank, each capturing its
all-reduces (nccl collectives are capturable on the graph's stream); a worker replays when told.

KV between a tp2 P and a tp1 D (and the reverse)
------------------------------------------------
Each rank's cache is [layers, 2, blocks, block_size, its kv heads, head_dim]; rank r holds kv
piece r * kv_pieces // world (`sharding.HeadSplit`), so its heads are a known range of the
whole. A hand-off names, per piece, the head range it carries:
- P tp2 -> D tp1: each P rank sends its heads' KV (`gather_kv` on that rank); D allocates the
  request's blocks once and writes each piece into its head range (an `inject_kv` with a head
  offset: a strided write along the head dim); the request is ready when every piece arrived.
  With fewer kv heads than ranks, only the first rank of each group holding a head sends it.
- P tp1 -> D tp2: P sends each D rank the slice of heads that rank holds (narrowed on the
  sending side, so each transfer carries only what its receiver keeps).
- In general, producer piece and consumer piece overlap in a head range; that overlap is what
  flows between that pair (cuda_ipc within a host). Layer-wise streaming is the same per layer.
  Request state (M-RoPE delta, sampled token) travels once, from rank 0 to rank 0.

The E stage: the vision tower replicated or split
-------------------------------------------------
Replicated (what exists: `build_rank_model` builds the whole tower on every rank): an E
instance of degree n is n encoders, each rank encoding its own images (IRP's split by patch
count, no collective), which should win at batch 8; an EPD rank now encodes every image
itself, redundantly (simple; rank r encoding 1/n of them and all-gathering the rows is the fix).
Split (Megatron on the ViT: qkv by heads, the MLP by columns, two all-reduces per block) cuts
the latency of one large image (batch 1) when the ViT's width amortizes the all-reduces
(Qwen2.5-VL's 1280 wide tower may not; InternViT-6B's 3200 should): the issue asks to measure
both at batch 1 and 8 before choosing.
"""
