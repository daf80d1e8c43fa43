"""Audio preprocessing as pure functions: encoded bytes -> mono waves -> log-mel spectrograms.

soundfile decode (WAV/FLAC), mono, band-limited FFT resampling, cut/zero-pad to the clip
length; log-mel ``(n_mels, F)`` float32 computed with a vectorised numpy STFT.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import soundfile as sf

LOG_MEL_FLOOR = 1e-6  # power floor before the log: silence -> log(1e-6) ~ -13.8
# Clips per STFT pass in `log_mel`. Its float64 frames and spectra take ~0.8 MB per one-second
# 16 kHz clip, so a 32-clip batch at once streams ~27 MB through memory several times; 8 clips
# stay in cache. It pays only together with `preprocess.reuse_freed_memory`: without it, in
# Ray workers, the more and smaller temporaries cost more page faults than the cache saves
# (figures: docs/performance.md).
LOG_MEL_ROWS = 8


def decode_audio(data: bytes, sample_rate: int, num_samples: int) -> np.ndarray:
    """Encoded WAV/FLAC bytes -> mono float32 ``(num_samples,)`` at ``sample_rate``.

    Only the part that survives the cut is resampled (FFT resampling, band-limited); short
    clips are zero-padded at the end.

    Raises:
        Exception: whatever soundfile raises on bytes it cannot decode.
    """
    with sf.SoundFile(io.BytesIO(data)) as f:
        src_rate = f.samplerate
        keep = int(np.ceil(num_samples * src_rate / sample_rate))
        wav = f.read(frames=keep, dtype="float32", always_2d=True)
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if src_rate != sample_rate and len(wav) > 0:
        wav = resample(wav, src_rate, sample_rate)
    out = np.zeros(num_samples, dtype=np.float32)
    n = min(num_samples, len(wav))
    out[:n] = wav[:n]
    return out


def resample(wav: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling by truncating/zero-padding the spectrum (like scipy's resample)."""
    n_out = int(round(len(wav) * dst_rate / src_rate))
    spec = np.fft.rfft(wav)
    n_bins = n_out // 2 + 1
    if n_bins <= len(spec):
        spec = spec[:n_bins]
    else:
        spec = np.concatenate([spec, np.zeros(n_bins - len(spec), dtype=spec.dtype)])
    return (np.fft.irfft(spec, n=n_out) * (n_out / len(wav))).astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """HTK-scale triangular filters, float64 ``(n_mels, n_fft // 2 + 1)``, 0 Hz .. Nyquist."""
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / np.maximum(centre - lower, 1e-9)
    down = (upper - freqs[None, :]) / np.maximum(upper - centre, 1e-9)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    fb *= (2.0 / np.maximum(upper - lower, 1e-9))  # Slaney-style area normalisation
    fb.setflags(write=False)
    return fb


@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    w = np.hanning(n + 1)[:-1]  # periodic Hann
    w.setflags(write=False)
    return w


def log_mel(waves: np.ndarray, sample_rate: int, n_mels: int, hop_length: int,
            n_fft: int) -> np.ndarray:
    """Log-mel spectrograms of a batch of clips, vectorised over the batch.

    Args:
        waves: float32 ``(B, N)``.

    Returns:
        float32 ``(B, n_mels, 1 + N // hop_length)``: centred STFT (reflect padding), power,
        mel filterbank, natural log with a floor of ``LOG_MEL_FLOOR``.
    """
    waves = np.asarray(waves)
    b = waves.shape[0]
    if b <= LOG_MEL_ROWS:
        return _log_mel_rows(waves, sample_rate, n_mels, hop_length, n_fft)
    parts = [_log_mel_rows(waves[s:s + LOG_MEL_ROWS], sample_rate, n_mels, hop_length, n_fft)
             for s in range(0, b, LOG_MEL_ROWS)]
    return np.concatenate(parts)


def _log_mel_rows(waves: np.ndarray, sample_rate: int, n_mels: int, hop_length: int,
                  n_fft: int) -> np.ndarray:
    # float64 throughout: numpy's float32 FFT is slower than its float64 one here, and one 2-D
    # matrix product (not a stack of per-clip ones) keeps BLAS from paying thread start-up
    # per clip (figures: docs/performance.md).
    waves = np.asarray(waves, dtype=np.float64)
    b, n = waves.shape
    pad = n_fft // 2
    padded = np.pad(waves, ((0, 0), (pad, pad)), mode="reflect" if n > pad else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop_length]
    spec = np.fft.rfft(frames * _hann(n_fft), axis=-1)  # (B, F, n_fft//2+1)
    f = spec.shape[1]
    power = np.square(spec.real).reshape(b * f, -1)
    power += np.square(spec.imag).reshape(b * f, -1)
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels).T  # (B*F, M)
    np.maximum(mel, LOG_MEL_FLOOR, out=mel)
    np.log(mel, out=mel)
    return np.ascontiguousarray(mel.reshape(b, f, n_mels).transpose(0, 2, 1), dtype=np.float32)
