"""Peak GPU memory of each stage of the pipeline, in bytes, from a model's shape (leanpo_core/shapes.py).

The model (N parameters, N_t trainable, G GPUs, s the ZeRO stage):
  states      weights + fp32 master + AdamW moments, as the setup keeps them. DeepSpeed bf16: weights 2N (/G at
              s=3), master 4N_t and moments 8N_t (/G at s>=1), grads 2N_t (/G at s>=2); no DeepSpeed (DDP, autocast):
              fp32 weights 4N, grads 4N_t (+4N_t of DDP buckets over >1 GPU), moments 8N_t
  activations the language model over B rows of P + 2R tokens with prefix sharing (the default), else 2B
              sequences of L = P + R tokens (B pairs per GPU): with checkpointing each layer's input (tokens*d)
              is kept and one layer is recomputed at a time; without, every layer keeps
              (6d + 5*heads*head_dim + 4I) values per token; plus the sdpa mask (length^2 bytes per row)
  logits      12 bytes per logit in backward (fp32 log-softmax output, its incoming and its outgoing gradient),
              over the response positions only (lean) or over every position (naive); chunked: one chunk, plus
              the output projection's fp32 gradient (4*V*d), so chunking pays only for long responses
  vision      frozen and without autograd: one block's activations over the video's patches at a time (naive:
              twice the patches)
  peak        the largest of: the logits' backward, the backward of the layers (checkpoints + one layer + the
              gradients so far), the optimizer step (gradients + states + its temporaries)
  scoring     reflect/evaluate, forward only: fp32 weights (bf16 where the stage's config says so) + the largest
              of one layer over the batch, the response logits (8 bytes each) and the vision tower
  vLLM        bf16 weights / TP + a profiling forward + 1 GiB outside torch (CUDA graphs) + the KV cache of one
              max_model_len sequence, within gpu_memory_utilization (0.9) of the GPU
A setting fits when its peak is at most 95% of the GPU's memory less 1 GiB (CUDA context, cuBLAS workspace, NCCL
buffers; the caching allocator's fragmentation). The estimate against measurements: README "Planning memory before a
run" (the bench/video_step_bench.py toy and the H100 figures of docs/method.md section 7).
"""

from __future__ import annotations

import dataclasses

from leanpo_core.config import TrainConfig
from leanpo_core.shapes import ModelSpec, lora_params, param_counts

GIB = 2**30
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers: outside torch's allocator
USABLE_SHARE = 0.95  # the rest: the caching allocator's fragmentation
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default; the project leaves it as it is
LOGIT_BACKWARD_BYTES = 12  # per logit: fp32 log-softmax output + incoming + outgoing gradient (measured: 12.0)


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a training step holds its tensors: bytes per parameter of each kind, and how ZeRO splits them."""

    name: str
    weight: int  # per parameter (all of them): the weights the step computes with
    grad: int  # per trainable parameter
    master: int  # fp32 master copy per trainable parameter (DeepSpeed's mixed precision)
    moments: int  # AdamW's two moments per trainable parameter
    step_temp: int  # optimizer-step temporaries per trainable parameter
    hidden: int  # per value of the residual stream (the checkpointed layer inputs)
    act: int  # per value of every other activation
    zero: int | None = None  # DeepSpeed ZeRO stage; None: no DeepSpeed (DDP over >1 GPU)
    gpus: int = 1

    @property
    def ddp_buckets(self) -> int:
        """DDP's flat gradient buckets, a second copy of the gradients, per trainable parameter."""
        return self.grad if self.zero is None and self.gpus > 1 else 0


def training_setup(config: TrainConfig, gpus: int, zero: int | None | str = "config") -> Setup:
    """The Setup `leanpo_core.train` runs `config` with on GPUs (precision auto = bf16).

    No DeepSpeed: the Trainer's autocast over fp32 weights (bf16 matmuls, an fp32 residual stream), fused AdamW.
    DeepSpeed (deployments/ds_zero*.json): bf16 weights and gradients, fp32 master and moments partitioned from
    stage 1, the gradients from stage 2, the weights at stage 3; the step converts its gradient partition to fp32.
    zero: "config" takes config.deepspeed; None or 0-3 overrides it.
    """
    stage = {"none": None, "zero2": 2, "zero3": 3}[config.deepspeed] if zero == "config" else zero
    bf16 = config.precision != "fp32"
    if stage is None:
        return Setup("ddp+autocast" if bf16 else "ddp fp32", weight=4, grad=4, master=0, moments=8, step_temp=0,
                     hidden=4, act=2 if bf16 else 4, zero=None, gpus=gpus)
    if bf16:  # stage 0 (BF16_Optimizer) keeps whole fp32 gradients next to the bf16 ones
        return Setup(f"zero{stage} bf16", weight=2, grad=2 + (4 if stage == 0 else 0), master=4, moments=8,
                     step_temp=0 if stage == 0 else 4, hidden=2, act=2, zero=stage, gpus=gpus)
    return Setup(f"zero{stage} fp32", weight=4, grad=4, master=4 if stage else 0, moments=8, step_temp=0, hidden=4,
                 act=4, zero=stage, gpus=gpus)


# A plain PyTorch step on one GPU: bf16 weights without a master copy, torch AdamW (foreach: one parameter-sized
# temporary in the step), as in bench/gpu_step.py and the H100 figures of docs/method.md section 7.
PURE_BF16_TORCH_ADAMW = Setup("bf16 torch AdamW", weight=2, grad=2, master=0, moments=4, step_temp=2, hidden=2,
                              act=2)
# The CPU benchmark (bench/video_step_bench.py): fp32 weights, torch AdamW (single-tensor on CPU), one process.
FP32_TORCH_ADAMW = Setup("fp32 torch AdamW", weight=4, grad=4, master=0, moments=8, step_temp=0, hidden=4, act=4)


@dataclasses.dataclass(frozen=True)
class Step:
    """One training micro-batch on one GPU: `pairs` pairs, so 2*pairs sequences of `tokens` tokens each, or with
    `prefix_shared` one `[prompt | chosen | rejected]` row of tokens + response tokens per pair."""

    pairs: int
    tokens: int  # per sequence, prompt + response
    response: int  # scored tokens per sequence
    patches: int  # vision-tower patches per video
    video_tokens: int  # language-model tokens per video
    checkpointing: bool = True
    chunk: int = 0  # logits_chunk_size; 0: the whole vocabulary at once
    lora_rank: int = 0  # 0: the whole language model trains
    vision_trains: bool = False
    lean: bool = True  # False: the naive step (vision once per sequence, full-vocabulary logits)
    prefix_shared: bool = False  # TrainConfig.prefix_sharing (lean only): the prompt once per pair


def _layer_bytes(spec: ModelSpec, act: int) -> tuple[int, int]:
    """(kept for backward, extra while its backward runs) bytes per token of one decoder layer.

    Kept: two RMSNorms (fp32 input and normalised output), q, k and v repeated to every head, the attention
    output and its log-sum-exp, the o_proj input, the MLP's gate, activation, up and product.
    """
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    kept = 2 * d * (4 + act) + 5 * qd * act + 4 * spec.heads + 4 * i * act
    return kept, (3 * i + 2 * d) * act


def _vision_bytes(spec: ModelSpec, patches: int, act: int) -> int:
    """The frozen tower's forward: its fp32 pixel input plus one block's activations over all patches."""
    pixels = patches * spec.in_channels * spec.temporal_patch * spec.patch**2 * 4
    return pixels + patches * (6 * spec.vision_width + 2 * spec.vision_mlp) * act


def train_memory(spec: ModelSpec, setup: Setup, step: Step) -> dict[str, float]:
    """Estimated bytes per GPU of one training step: the parts and `peak` (see the module docstring)."""
    params = param_counts(spec)
    d, vocab, layers = spec.hidden, spec.vocab, spec.layers
    lm = params.language + params.lm_head
    trainable = lora_params(spec, step.lora_rank) if step.lora_rank else lm
    trainable += params.vision + params.projector if step.vision_trains else 0
    gpus, stage = setup.gpus, setup.zero

    def split(count: float, from_stage: int) -> float:
        return count / gpus if stage is not None and stage >= from_stage else count

    weights = setup.weight * split(params.total, 3)
    if stage == 3:  # gathered for compute: the largest module, and the next one prefetched
        weights += 2 * setup.weight * max(vocab * d, params.layer)
    optimizer = (setup.master + setup.moments) * split(trainable, 1)
    grads = setup.grad * split(trainable, 2)
    if stage is not None and stage >= 2:  # reduce buckets ("auto": hidden^2 values)
        grads += 2 * setup.grad * d * d
    static = weights + optimizer + setup.ddp_buckets * trainable
    in_backward = 0.0 if stage is not None else grads  # DeepSpeed's gradient buffers are allocated once
    static += grads - in_backward
    seqs = 2 * step.pairs  # scored sequences
    rows_lm, length = (step.pairs, step.tokens + step.response) if step.prefix_shared else (seqs, step.tokens)
    tokens = rows_lm * length
    kept, extra = _layer_bytes(spec, setup.act)
    rope = 2 * tokens * spec.head_dim * setup.act
    mask = rows_lm * length**2 * (1 + setup.act)  # the (padding or prefix-sharing) mask, and sdpa's additive copy
    checkpoint = tokens * d * setup.hidden  # one layer's input
    videos = step.pairs if step.lean else seqs
    vision = _vision_bytes(spec, videos * step.patches, setup.act)
    copies = 1 if step.prefix_shared else 2  # features, and their copy for each row that shows them
    vision += (1 + copies) * step.pairs * step.video_tokens * d * setup.act
    if step.vision_trains:
        vision += spec.vision_depth * videos * step.patches * spec.vision_width * setup.act
    rows = seqs * (step.response if step.lean else step.tokens)
    if step.lean and step.chunk and step.chunk < vocab:  # one chunk's logits; the fp32 weight gradient
        logits = rows * step.chunk * LOGIT_BACKWARD_BYTES + 4 * vocab * d + 8 * rows * d
    else:
        logits = rows * vocab * LOGIT_BACKWARD_BYTES
    head_grad = 0.0 if step.lora_rank or stage is not None else setup.grad * vocab * d
    if step.checkpointing:
        stored = layers * checkpoint
        layer_phase = kept * tokens + extra * tokens + max(stored, checkpoint + in_backward)
    else:
        stored = layers * kept * tokens
        layer_phase = stored + extra * tokens + head_grad
    shared = rope + mask + (4 + setup.act) * tokens * d  # + the final norm
    phases = {"vision forward": static + vision,
              "logits backward": static + shared + stored + logits + head_grad,
              "layers backward": static + shared + layer_phase,
              "optimizer step": static + in_backward + setup.step_temp * split(trainable, 1)}
    where = max(phases, key=phases.get)
    return {"weights": weights, "optimizer": optimizer, "grads": grads, "activations": stored + shared,
            "logits": logits, "vision": vision, "peak": phases[where], "peak_phase": where,
            "trainable": trainable}


def scoring_memory(spec: ModelSpec, batch: int, tokens: int, response: int, patches: int, bf16: bool) -> dict:
    """Bytes of the reflect/evaluate likelihood pass: `batch` sequences (each its own video), forward only."""
    act = 2 if bf16 else 4
    weights = param_counts(spec).total * act
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    total = batch * tokens
    layer = total * (2 * d + 4 * qd + 3 * i) * act + batch * tokens**2 * (1 + act)
    logits = batch * response * spec.vocab * 8  # fp32 logits and their log-softmax
    vision = _vision_bytes(spec, batch * patches, act)
    return {"weights": weights, "activations": layer, "logits": logits, "vision": vision,
            "peak": weights + max(layer, logits + total * d * act, vision)}


def vllm_memory(spec: ModelSpec, tensor_parallel: int, max_model_len: int, max_num_seqs: int,
                patches: int) -> dict:
    """Bytes per GPU vLLM needs: bf16 weights, its profiling forward (16384 batched tokens, the encoder on one
    video, the sampler's logits), 1 GiB outside torch (CUDA graphs), and the KV cache of one max_model_len
    sequence; `kv_per_token` sizes the rest of the cache."""
    weights = param_counts(spec).total * 2 / tensor_parallel
    d, qd, i = spec.hidden, spec.heads * spec.head_dim, spec.intermediate
    batched = max(16384, max_model_len)
    forward = batched * (2 * d + 4 * qd + 3 * i) * 2 / tensor_parallel + max_num_seqs * spec.vocab * 8
    forward = max(forward, _vision_bytes(spec, patches, 2))
    kv_per_token = 2 * spec.layers * max(1, spec.kv_heads // tensor_parallel) * spec.head_dim * 2
    return {"weights": weights, "activations": forward, "non_torch": GIB, "kv_per_token": kv_per_token,
            "peak": weights + forward + GIB + kv_per_token * max_model_len}


def usable_bytes(gpu_memory_gib: float) -> float:
    """What a torch process can allocate on a GPU of that size (see the module docstring)."""
    return (USABLE_SHARE * gpu_memory_gib - CONTEXT_GIB) * GIB
