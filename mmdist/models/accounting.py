"""Analytic parameter counts and training FLOPs per sample, from the config alone.

Nothing is built, so the 1b / 7b presets can be sized on a laptop and the MFU benchmark can
divide measured throughput by ``flops_per_sample``. Counted: matrix multiplies, convolutions
and attention scores (2 FLOPs per multiply-add), the same operations torch's
``FlopCounterMode`` counts; norms, activations and softmax are left out. Training FLOPs are
3x the forward pass (backward ~ 2x forward).

    params = parameter_count(cfg, vocab_size)        # equals count_parameters(build_model(...))
    flops = flops_per_sample(cfg, vocab_size)        # training FLOPs of one sample
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmdist.config import Config, task_class
from mmdist.data.schema import audio_frames
from mmdist.models.builder import DECODER_POSITIONS, SLOTS, aux_modalities, encoded_modalities
from mmdist.models.input_embeddings import AUDIO_TOKENS, stem_channels
from mmdist.models.sizes import SizeSpec, size_spec

# Published torchvision sizes at 224 px (classifier excluded) and forward MACs at 224 px.
TORCHVISION = {
    "resnet18": {"params": 11_689_512 - 513_000, "macs": 1.814e9, "width": 512},
    "resnet50": {"params": 25_557_032 - 2_049_000, "macs": 4.089e9, "width": 2048},
}
VIT_B16 = {"width": 768, "layers": 12, "mlp": 3072, "patch": 16}


@dataclass
class Cost:
    """Parameters and forward FLOPs (per sample) of a part; ``tokens`` it outputs."""

    params: float = 0.0
    flops: float = 0.0
    tokens: int = 0

    def __add__(self, o: Cost) -> Cost:
        return Cost(self.params + o.params, self.flops + o.flops, o.tokens or self.tokens)


def linear_cost(i: int, o: int, n: float = 1, bias: bool = True) -> Cost:
    return Cost(i * o + (o if bias else 0), 2.0 * i * o * n)


def ln_cost(d: int) -> Cost:
    return Cost(2 * d, 0.0)


def _block(d: int, t: int, tk: int | None = None) -> Cost:
    """One of mmdist's pre-LN transformer blocks on t tokens (cross-attending to tk tokens)."""
    tk = t if tk is None else tk
    c = ln_cost(d) + linear_cost(d, d, t) + linear_cost(d, 2 * d, tk) + linear_cost(d, d, t) + ln_cost(d)
    c = c + Cost(2 * d)  # QK-norm gains
    c = c + linear_cost(d, 4 * d, t) + linear_cost(4 * d, d, t)
    return c + Cost(0, 4.0 * t * tk * d)


def _stack(d: int, t: int, layers: int) -> Cost:
    c = Cost()
    for _ in range(layers):
        c = c + _block(d, t)
    return c + ln_cost(d)


def _rnn(gates: int, i: int, h: int, t: int, layers: int, bidirectional: bool) -> Cost:
    dirs = 2 if bidirectional else 1
    c = Cost()
    for layer in range(layers):
        inp = i if layer == 0 else h * dirs
        per_dir = gates * h * (inp + h) + 2 * gates * h
        c = c + Cost(dirs * per_dir, dirs * 2.0 * gates * h * (inp + h) * t)
    return c


def _conv_out(n: int) -> int:  # kernel 3, stride 2, padding 1
    return (n - 1) // 2 + 1


def mlp_head_cost(d: int, out: int, n: int = 1) -> Cost:
    return ln_cost(d) + linear_cost(d, d, n) + linear_cost(d, out, n)


def _text_encoder(kind: str, s: SizeSpec, vocab: int, length: int) -> Cost:
    d = s.hidden
    if kind in ("lstm", "gru"):
        h = d // 2
        c = Cost(vocab * d) + _rnn(4 if kind == "lstm" else 3, d, h, length, s.enc_layers, True)
        return c + linear_cost(2 * h, d, length) + ln_cost(d) + Cost(tokens=length)
    # bert: embeddings (word, position, token type) + LN, layers, projection
    p = max(length, 64)
    c = Cost((vocab + p + 2) * d) + ln_cost(d)
    for _ in range(s.enc_layers):
        c = c + linear_cost(d, d, length) + linear_cost(d, d, length) + linear_cost(d, d, length)
        c = c + linear_cost(d, d, length) + ln_cost(d) + linear_cost(d, 4 * d, length)
        c = c + linear_cost(4 * d, d, length) + ln_cost(d) + Cost(0, 4.0 * length * length * d)
    return c + linear_cost(d, d, length) + ln_cost(d) + Cost(tokens=length)


def _cnn(channels: tuple[int, ...], c_in: int, size: int, dim: int, two_d: bool) -> Cost:
    """The conv stacks: 2-D for images, 1-D for audio."""
    c = Cost()
    n = size
    k = 9 if two_d else 3
    for ch in channels:
        n = _conv_out(n)
        pos = n * n if two_d else n
        c = c + Cost(c_in * ch * k + ch + 2 * ch, 2.0 * c_in * ch * k * pos)
        c_in = ch
    t = n * n if two_d else n
    return c + linear_cost(c_in, dim, t) + ln_cost(dim) + Cost(tokens=t)


def _image_encoder(kind: str, s: SizeSpec, size: int) -> Cost:
    d = s.hidden
    if kind == "cnn":
        c = _cnn(s.cnn_channels, 3, size, d, two_d=True)
        n = size
        for ch in s.cnn_channels:  # a residual 3x3 conv + GroupNorm per stage
            n = _conv_out(n)
            c = c + Cost(ch * ch * 9 + 3 * ch, 2.0 * ch * ch * 9 * n * n)
        return c + Cost(c.tokens * d)  # a position per cell
    if kind in TORCHVISION:
        tv = TORCHVISION[kind]
        grid = math.ceil(size / 32)
        t = grid * grid + 1
        c = Cost(tv["params"], 2.0 * tv["macs"] * (size / 224) ** 2)
        return c + linear_cost(tv["width"], d, t) + ln_cost(d) + Cost(tokens=t)
    v = VIT_B16
    w, t = v["width"], (size // v["patch"]) ** 2 + 1
    c = Cost(3 * v["patch"] ** 2 * w + w, 2.0 * 3 * v["patch"] ** 2 * w * (t - 1))
    c = c + Cost(w + t * w)  # class token, positions
    for _ in range(v["layers"]):  # torchvision encoder block: LN, MHA, LN, MLP
        c = c + ln_cost(w) + linear_cost(w, 3 * w, t) + linear_cost(w, w, t) + ln_cost(w)
        c = c + linear_cost(w, v["mlp"], t) + linear_cost(v["mlp"], w, t) + Cost(0, 4.0 * t * t * w)
    return c + ln_cost(w) + linear_cost(w, d, t) + ln_cost(d) + Cost(tokens=t)


def _audio_encoder(kind: str, s: SizeSpec, n_mels: int, frames: int) -> Cost:
    d = s.hidden
    if kind == "conv":
        return _cnn(s.cnn_channels, n_mels, frames, d, two_d=False)
    t = math.ceil(frames / 4)
    return linear_cost(n_mels, d, t) + Cost(t * d) + _stack(d, t, s.enc_layers) + Cost(tokens=t)


def _video_encoder(cfg: Config, s: SizeSpec, vocab: int, audio_frames_: int) -> Cost:
    """The frame encoder (the stage's image encoder) on K frames, then the temporal part."""
    m, k, d = cfg.model, cfg.data.video_frames, s.hidden
    frame = (_early("image", s, cfg, vocab, audio_frames_) if m.fusion_stage == "early"
             else _image_encoder(m.image_encoder, s, cfg.data.image_size))
    c = Cost(frame.params, k * frame.flops)  # one set of weights, run on every frame
    if m.video_temporal == "mean":
        return c + Cost(tokens=frame.tokens)
    c = c + Cost(k * d)  # the time embedding
    if m.video_temporal == "tokens":
        return c + Cost(tokens=k * frame.tokens)
    return c + _stack(d, k, max(1, s.enc_layers)) + Cost(tokens=k)


def _early(mod: str, s: SizeSpec, cfg: Config, vocab: int, frames: int) -> Cost:
    d, data = s.hidden, cfg.data
    if mod == "text":
        return Cost(vocab * d + data.max_text_len * d) + ln_cost(d) + Cost(tokens=data.max_text_len)
    if mod == "image":  # the convolutional stem, a 1x1 projection, positions
        c, c_in, size = Cost(), 3, data.image_size
        for ch in stem_channels(data.image_size, d):
            size = _conv_out(size)
            c = c + Cost(c_in * ch * 9 + ch + 2 * ch, 2.0 * c_in * ch * 9 * size * size)
            c = c + Cost(ch * ch * 9 + 3 * ch, 2.0 * ch * ch * 9 * size * size)  # residual
            c_in = ch
        t = size * size
        return c + linear_cost(c_in, d, t) + Cost(t * d) + ln_cost(d) + Cost(tokens=t)
    stride = math.ceil(frames / AUDIO_TOKENS)
    t = math.ceil(frames / stride)
    return linear_cost(cfg.data.n_mels, d, t) + Cost(t * d) + ln_cost(d) + Cost(tokens=t)


def _fusion(name: str, s: SizeSpec, tokens: list[int], k: int) -> Cost:
    d, m = s.hidden, len(tokens)
    if name == "concat":
        return linear_cost(m * d, d, k) + ln_cost(d) + Cost(tokens=k)
    if name == "add":
        return ln_cost(d) + Cost(tokens=k)
    if name == "mul":
        return Cost(m * (d * d + d), 2.0 * m * d * d * k) + ln_cost(d) + Cost(tokens=k)
    if name == "weighted":
        c = Cost(m) + linear_cost(d, 1, m * k) + Cost(m * (d * d + d), 2.0 * m * d * d * k)
        return c + ln_cost(d) + Cost(tokens=k)
    if name == "conv":
        kernel = 3
        c = Cost(d * d * kernel + d, 2.0 * d * d * kernel * m * k) + linear_cost(m * d, d, k)
        return c + ln_cost(d) + Cost(tokens=k)
    if name == "recurrent":
        return (_rnn(3, d, d, m * k, s.fusion_layers, False) + linear_cost(d, d, k) + ln_cost(d)
                + Cost(tokens=k))
    if name == "attention":
        tq = tokens[0]
        tk = sum(tokens[1:]) if m > 1 else tq
        c = Cost()
        for _ in range(s.fusion_layers):
            c = c + _block(d, tq, tk)
        return c + ln_cost(d) + ln_cost(d) + Cost(tokens=tq)
    # transformer
    t = sum(tokens)
    c = Cost(m * d)
    for _ in range(s.fusion_layers):
        c = c + _block(d, t)
    return c + ln_cost(d) + Cost(tokens=t)


def decoder_cost(kind: str, cond: str, s: SizeSpec, vocab: int, length: int, memory: int,
             d: int) -> Cost:
    w, n_layers, t = s.dec_width, s.dec_layers, length - 1
    n = t + memory if cond == "prefix" else t  # positions the LM runs on
    c = linear_cost(d, w, memory) + ln_cost(w)  # memory projection
    if kind == "lstm":
        c = c + Cost(vocab * w) + linear_cost(w, 2 * n_layers * w)
        c = c + _rnn(4, w, w, n, n_layers, False) + linear_cost(2 * w, w, t) + ln_cost(w)
        if cond != "prefix":
            c = c + Cost(0, 4.0 * t * memory * w)
        return c + linear_cost(w, vocab, t)
    if kind == "gpt2":
        c = c + Cost((vocab + DECODER_POSITIONS + length) * w)
        for _ in range(n_layers):
            c = c + ln_cost(w) + linear_cost(w, 3 * w, n) + linear_cost(w, w, n) + ln_cost(w)
            c = c + linear_cost(w, 4 * w, n) + linear_cost(4 * w, w, n) + Cost(0, 4.0 * n * n * w)
            if cond == "cross_attention":
                c = c + ln_cost(w) + linear_cost(w, w, n) + linear_cost(w, 2 * w, memory)
                c = c + linear_cost(w, w, n) + Cost(0, 4.0 * n * memory * w)
        return c + ln_cost(w) + Cost(0, 2.0 * n * w * vocab)  # lm head tied to the embedding
    # llama: bias-free q/k/v/o, SwiGLU MLP, RMSNorm, untied head
    c = c + Cost(vocab * w)
    for _ in range(n_layers):
        c = c + Cost(2 * w) + linear_cost(w, w, n, False)
        c = c + linear_cost(w, 2 * w, n, False) + linear_cost(w, w, n, False)
        c = c + linear_cost(w, 2 * s.dec_ffn, n, False) + linear_cost(s.dec_ffn, w, n, False)
        c = c + Cost(0, 4.0 * n * n * w)
    return c + Cost(w) + linear_cost(w, vocab, n, False)


def _costs(cfg: Config, vocab_size: int) -> Cost:
    m, data = cfg.model, cfg.data
    given = [f"model.{k}_pretrained" for k in ("decoder", "text", "image", "audio")
             if getattr(m, f"{k}_pretrained")]
    if given:  # their shapes are in their directories, not in the size presets counted here
        raise ValueError(f"{', '.join(given)}: the analytic parameter and FLOP counts cover "
                         "mmdist's own architectures, not pretrained parts")
    s = size_spec(m.size, m.hidden_size)
    d = s.hidden
    frames = audio_frames(data.sample_rate, data.audio_seconds, data.hop_length)
    mods = [x for x in ("text", "image", "audio", "video") if x in m.modalities]
    total = Cost(len(mods) * d)  # missing-modality embeddings
    tasks = list(task_class(m.task).components(m))
    enc_tokens: dict[str, int] = {}
    for mod in encoded_modalities(mods, tasks):
        if mod == "video":
            c = _video_encoder(cfg, s, vocab_size, frames)
        elif m.fusion_stage == "early":
            c = _early(mod, s, cfg, vocab_size, frames)
        elif mod == "text":
            c = _text_encoder(m.text_encoder, s, vocab_size, data.max_text_len)
        elif mod == "image":
            c = _image_encoder(m.image_encoder, s, data.image_size)
        else:
            c = _audio_encoder(m.audio_encoder, s, data.n_mels, frames)
        # model.modality_tokens average-pools (no FLOPs counted) down to at most that many
        enc_tokens[mod] = min(c.tokens, m.modality_tokens.get(mod, c.tokens))
        total = total + Cost(c.params, c.flops)

    trunk_layers = s.trunk_layers + (s.enc_layers if m.fusion_stage == "early" else 0)
    fusers: dict[str, Cost] = {}
    for group in sorted(set().union(*(task_class(t).groups(m) for t in tasks))):
        gm = mods if group == "all" else [x for x in mods if x != "text"]
        if not gm:
            total = total + Cost(d)  # null memory token
            fusers[group] = Cost(0, 0, 1)
            continue
        tokens = [enc_tokens[x] for x in gm]
        c = Cost()
        if m.fusion_stage == "late":
            for _ in gm:
                c = c + mlp_head_cost(d, d) + ln_cost(d)
            tokens = [1] * len(gm)
        f = _fusion(m.fusion, s, tokens, SLOTS[m.fusion_stage])
        c = c + f
        trunk = Cost()
        for _ in range(trunk_layers):
            trunk = trunk + _block(d, f.tokens)
        fusers[group] = c + trunk + ln_cost(d) + Cost(tokens=f.tokens)
        total = total + Cost(fusers[group].params)
    for n in aux_modalities(cfg, list(enc_tokens)).values():
        total = total + linear_cost(d, n)
    for t in tasks:
        task = task_class(t)
        read = [fusers[g] for g in sorted(task.groups(m))]
        total = total + Cost(0, task.passes(m) * sum(f.flops for f in read))
        total = total + task.head_cost(cfg, s, vocab_size, read[0].tokens if read else 0)
    return total


def parameter_count(cfg: Config, vocab_size: int) -> int:
    """Parameters of ``build_model(cfg, vocab_size)`` without building it."""
    return int(round(_costs(cfg, vocab_size).params))


def flops_per_sample(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs (forward + backward ~ 3x forward) for one sample of ``cfg``."""
    return 3.0 * _costs(cfg, vocab_size).flops


def forward_flops_per_sample(cfg: Config, vocab_size: int) -> float:
    """Forward FLOPs for one sample (no generation)."""
    return _costs(cfg, vocab_size).flops
