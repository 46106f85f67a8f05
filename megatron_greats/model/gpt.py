"""A decoder-only transformer from megatron-core's tensor-parallel primitives, as a list of pipeline layers.

The same list of DeepSpeed LayerSpecs builds either a PipelineModule (parallel.pipeline > 1) or a plain
sequential module (parallel.pipeline == 1, any ZeRO stage), so both paths run identical layers.

Two flavours: "gpt2" (LayerNorm, GeLU, learned positions, biases) and "llama" (RMSNorm, SwiGLU, RoPE,
no biases). Activations between layers are [seq, batch, hidden] (Megatron layout; the sample index is
dim 1); with sequence parallelism the seq dim is this rank's shard.

Every layer's initial weights depend only on (seed, layer index): megatron-core's CPU initialisation
draws the full master weight and keeps this rank's slice, so the model starts identical at any layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from megatron_greats.choices import GPT2, LLAMA


@dataclass(frozen=True)
class ModelSpec:
    """Everything the layers need, resolved from the run config (picklable, no process state)."""

    arch: str
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    seq_len: int
    vocab_size: int  # padded
    tie_embeddings: bool
    dropout: float
    init_std: float
    norm_eps: float
    rope_base: float
    tensor_parallel: int
    sequence_parallel: bool

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "ModelSpec":
        m = cfg.model
        multiple = m.vocab_pad_multiple
        return cls(arch=m.arch, num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                   ffn_hidden_size=cfg.ffn_hidden_size, seq_len=m.seq_len,
                   vocab_size=multiple * math.ceil(vocab_size / multiple), tie_embeddings=m.tie_embeddings,
                   dropout=m.dropout, init_std=m.init_std, norm_eps=m.norm_eps, rope_base=m.rope_base,
                   tensor_parallel=cfg.parallel.tensor, sequence_parallel=cfg.parallel.sequence_parallel)

    def parallel_config(self) -> ModelParallelConfig:
        # CPU initialisation makes weights independent of the layout (see module docstring);
        # gradient-accumulation fusion writes main_grad through a CUDA-only kernel: off.
        return ModelParallelConfig(tensor_model_parallel_size=self.tensor_parallel,
                                   sequence_parallel=self.sequence_parallel, use_cpu_initialization=True,
                                   perform_initialization=True, params_dtype=torch.float32,
                                   gradient_accumulation_fusion=False)


def _normal(std):
    return partial(nn.init.normal_, mean=0.0, std=std)


def _replicated(param: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """A parameter used on sequence shards: its gradient is the sum over tensor-parallel ranks.

    Forward identity, backward all-reduce, so every engine sees the full gradient without a
    separate reduction step.
    """
    return copy_to_tensor_model_parallel_region(param) if spec.sequence_parallel else param


class _Norm(nn.Module):
    """Per-feature scale (and shift): parameter names `weight`/`bias` as in torch, so checkpoints keep their keys."""

    def __init__(self, spec: ModelSpec, bias: bool):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.ones(spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size)) if bias else None


class LayerNorm(_Norm):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec, bias=True)

    def forward(self, x):
        bias = None if self.bias is None else _replicated(self.bias, self.spec)
        return F.layer_norm(x, (x.shape[-1],), _replicated(self.weight, self.spec), bias, self.spec.norm_eps)


class RMSNorm(_Norm):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec, bias=False)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), _replicated(self.weight, self.spec), self.spec.norm_eps)


NORMS = {GPT2: LayerNorm, LLAMA: RMSNorm}


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on [batch, heads, seq, head_dim] (rotating halves, as Llama does)."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), inv_freq)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    half1, half2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-half2, half1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, config: ModelParallelConfig):
        super().__init__()
        self.spec = spec
        self.head_dim = spec.hidden_size // spec.num_heads
        self.local_heads = spec.num_heads // spec.tensor_parallel
        bias = spec.arch == GPT2
        # Output features are laid out [head, (q, k, v), head_dim], so a tensor-parallel shard of the
        # output dim holds whole heads.
        self.qkv = ColumnParallelLinear(spec.hidden_size, 3 * spec.hidden_size, config=config, bias=bias,
                                        gather_output=False, init_method=_normal(spec.init_std))
        self.proj = RowParallelLinear(spec.hidden_size, spec.hidden_size, config=config, bias=bias,
                                      input_is_parallel=True, skip_bias_add=True,
                                      init_method=_normal(spec.init_std / math.sqrt(2 * spec.num_layers)))

    def forward(self, x):
        qkv, _ = self.qkv(x)
        seq, batch = qkv.shape[:2]
        q, k, v = qkv.view(seq, batch, self.local_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4)
        if self.spec.arch == LLAMA:
            q, k = rotary(q, self.spec.rope_base), rotary(k, self.spec.rope_base)
        dropout = self.spec.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        out = out.permute(2, 0, 1, 3).reshape(seq, batch, self.local_heads * self.head_dim)
        out, bias = self.proj(out)
        return out if bias is None else out + _replicated(bias, self.spec)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, config: ModelParallelConfig):
        super().__init__()
        self.spec = spec
        h, f, init = spec.hidden_size, spec.ffn_hidden_size, _normal(spec.init_std)
        gpt2 = spec.arch == GPT2
        self.fc_in = ColumnParallelLinear(h, f, config=config, bias=gpt2, gather_output=False, init_method=init)
        # SwiGLU's gate is its own layer (not fused with fc_in) so every TP shard pairs matching columns.
        self.fc_gate = None if gpt2 else ColumnParallelLinear(h, f, config=config, bias=False,
                                                              gather_output=False, init_method=init)
        self.fc_out = RowParallelLinear(f, h, config=config, bias=gpt2, input_is_parallel=True, skip_bias_add=True,
                                        init_method=_normal(spec.init_std / math.sqrt(2 * spec.num_layers)))

    def forward(self, x):
        up, _ = self.fc_in(x)
        if self.fc_gate is None:
            hidden = F.gelu(up, approximate="tanh")
        else:
            gate, _ = self.fc_gate(x)
            hidden = F.silu(gate) * up
        out, bias = self.fc_out(hidden)
        return out if bias is None else out + _replicated(bias, self.spec)


class TransformerLayer(nn.Module):
    def __init__(self, spec: ModelSpec, block: int = 0):
        super().__init__()
        config = spec.parallel_config()
        self.spec, self.block = spec, block  # block: 0 for the lowest transformer layer
        self.attn_norm = NORMS[spec.arch](spec)
        self.attention = SelfAttention(spec, config)
        self.mlp_norm = NORMS[spec.arch](spec)
        self.mlp = MLP(spec, config)

    def forward(self, h):
        p = self.spec.dropout if self.training else 0.0
        h = h + F.dropout(self.attention(self.attn_norm(h)), p)
        return h + F.dropout(self.mlp(self.mlp_norm(h)), p)


class TokenEmbedding(nn.Module):
    """Vocab-parallel token embedding; with tied embeddings it also computes the output logits."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        config = spec.parallel_config()
        self.word = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, init_method=_normal(spec.init_std),
                                           config=config)
        self.output = None
        if spec.tie_embeddings:
            self.output = ColumnParallelLinear(spec.hidden_size, spec.vocab_size, config=config, bias=False,
                                               gather_output=False, init_method=_normal(spec.init_std),
                                               skip_weight_param_allocation=True)

    def forward(self, tokens):  # [batch, seq] -> [seq, batch, hidden]
        # [batch, seq] ids, as megatron-core's own LanguageModelEmbedding calls it
        return self.word(tokens).transpose(0, 1).contiguous()

    def logits(self, h):  # [seq, batch, hidden] -> [seq, batch, vocab / tp]
        out, _ = self.output(h, weight=self.word.weight)
        return out


class EmbeddingOutput(nn.Module):
    """Learned positions (gpt2), embedding dropout, and the split into sequence shards."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.positions = None
        if spec.arch == GPT2:
            self.positions = nn.Embedding(spec.seq_len, spec.hidden_size)
            nn.init.normal_(self.positions.weight, std=spec.init_std)

    def forward(self, h):  # [seq, batch, hidden]
        if self.positions is not None:
            # looked up per sample ([seq, batch] ids), so each sample's position gradient stays its own
            ids = torch.arange(h.shape[0], device=h.device).unsqueeze(1).expand(h.shape[0], h.shape[1])
            h = h + self.positions(ids)
        h = F.dropout(h, self.spec.dropout if self.training else 0.0)
        # Positions were added on the full sequence: the scatter's backward gathers their gradient,
        # so it is complete and identical on every tensor-parallel rank.
        return scatter_to_sequence_parallel_region(h) if self.spec.sequence_parallel else h


class OutputLayer(nn.Module):
    """Untied output projection."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.output = ColumnParallelLinear(spec.hidden_size, spec.vocab_size, config=spec.parallel_config(),
                                           bias=False, gather_output=False, init_method=_normal(spec.init_std))

    def forward(self, h):
        out, _ = self.output(h)
        return out


def _tied_logits(embedding: TokenEmbedding, h):
    return embedding.logits(h)


def layer_specs(spec: ModelSpec) -> list:
    """The model as a list of DeepSpeed layer specs; index i is seeded with (seed + i) when built."""
    if spec.tie_embeddings:
        first = TiedLayerSpec("embedding", TokenEmbedding, spec, tied_weight_attr="word.weight")
        last = TiedLayerSpec("embedding", TokenEmbedding, spec, tied_weight_attr="word.weight",
                             forward_fn=_tied_logits)
    else:
        first, last = LayerSpec(TokenEmbedding, spec), LayerSpec(OutputLayer, spec)
    return ([first, LayerSpec(EmbeddingOutput, spec)]
            + [LayerSpec(TransformerLayer, spec, block) for block in range(spec.num_layers)]
            + [LayerSpec(NORMS[spec.arch], spec), last])


def parameters_below_top_layers(module: nn.Module, top: int) -> set:
    """The parameters of this model (or pipeline stage) that sit below its top `top` transformer layers:
    the lower transformer layers and the embeddings, including a tied embedding that the output layer
    also uses (its gradient has a part from below). Found by module type, so the same for SequentialGPT
    and a PipelineModule stage."""
    below = set()
    for m in module.modules():
        lower_block = isinstance(m, TransformerLayer) and m.block < m.spec.num_layers - top
        if lower_block or isinstance(m, (TokenEmbedding, EmbeddingOutput)):
            below.update(m.parameters())
    return below


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy of each sample: logits [seq, batch, vocab/tp], labels [batch, seq] -> [batch]."""
    # megatron-core computes the softmax in float32 whatever the logits' dtype
    token_losses = vocab_parallel_cross_entropy(logits, labels.t().contiguous())
    return token_losses.mean(dim=0)


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of a micro-batch: the mean of its per-sample losses (the pipeline engine's loss_fn)."""
    return per_sample_losses(logits, labels).mean()


class SequentialGPT(nn.Module):
    """The layer specs built in one process (no pipeline): forward(tokens) -> logits [seq, batch, vocab/tp]."""

    def __init__(self, specs: list, seed: int):
        super().__init__()
        self.layers = nn.ModuleList()
        self._calls = []
        tied = {}
        for index, layer in enumerate(specs):
            torch.manual_seed(seed + index)  # as PipelineModule(seed_layers=True, seed_fn=torch.manual_seed)
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in tied:
                    tied[layer.key] = layer.build()
                    self.layers.append(tied[layer.key])
                module = tied[layer.key]
                self._calls.append(module if layer.forward_fn is None else partial(layer.forward_fn, module))
            else:
                module = layer.build()
                self.layers.append(module)
                self._calls.append(module)
        self.checkpoint_activations = False

    def forward(self, tokens):
        h = tokens
        for call in self._calls:
            if self.checkpoint_activations and isinstance(call, TransformerLayer) and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(call, h, use_reentrant=False)
            else:
                h = call(h)
        return h
