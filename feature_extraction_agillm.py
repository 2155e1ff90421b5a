# Copyright 2025 The AGILLM authors. Licensed under the Apache License, Version 2.0.
"""Audio feature extractor for AGILLM: mono waveforms -> log-mel `input_features` [B, n_mels, frames].

Modeled on transformers' Whisper feature extractor (`feature_extraction_whisper.py`): the STFT and mel filters come
from `transformers.audio_utils` (`spectrogram`, `mel_filter_bank`), and the log-mel is scaled the Whisper way (log10,
clamped to 8 decades below the clip's peak, then `(x + 4) / 4`). Unlike Whisper it does not pad every clip to 30 s:
a batch is padded to its longest clip, with an `attention_mask` over frames, and audio recorded at another rate is
resampled (scipy's polyphase `resample_poly`) when the caller says which rate it has.
"""

from math import gcd

import numpy as np
from scipy.signal import resample_poly

from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, logging


logger = logging.get_logger(__name__)


class AgillmFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Log-mel spectrogram features for mono audio.

    Args:
        feature_size (`int`, *optional*, defaults to 80): number of mel bins (`n_mels`).
        sampling_rate (`int`, *optional*, defaults to 16000): the rate the features are computed at; other rates
            are resampled to it when `sampling_rate=` is passed to `__call__`.
        n_fft (`int`, *optional*, defaults to 400): STFT window length in samples (25 ms at 16 kHz).
        hop_length (`int`, *optional*, defaults to 160): samples between frames (10 ms at 16 kHz). A clip of `n`
            samples gives `1 + n // hop_length` frames (centred STFT).
        padding_value (`float`, *optional*, defaults to 0.0): feature value written into padded frames.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        feature_size=80,
        sampling_rate=16000,
        n_fft=400,
        hop_length=160,
        padding_value=0.0,
        return_attention_mask=True,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if n_fft <= 0 or hop_length <= 0:
            raise ValueError(f"n_fft and hop_length must be positive, got n_fft={n_fft}, hop_length={hop_length}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.mel_filters = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=feature_size,
            min_frequency=0.0,
            max_frequency=sampling_rate / 2,
            sampling_rate=sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )

    def __call__(
        self,
        raw_speech: np.ndarray | list[float] | list[np.ndarray],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        return_attention_mask: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Featurise one clip (1-D array or list of floats) or a batch (2-D array [B, samples] or a list of 1-D clips).

        Args:
            raw_speech: mono audio, floats in [-1, 1]. Stereo is refused: mix it down first (`audio.mean(axis=-1)`).
            sampling_rate (`int`, *optional*): the rate `raw_speech` was recorded at; resampled when it differs
                from `self.sampling_rate`. Strongly recommended, as in Whisper: without it the rate is assumed.
            return_tensors (`str`, *optional*): "pt" or "np".
            return_attention_mask (`bool`, *optional*): defaults to `self.return_attention_mask` (True).
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected arguments {sorted(kwargs)}")
        if sampling_rate is None:
            logger.warning(
                f"It is strongly recommended to pass the `sampling_rate` argument to `{self.__class__.__name__}()`. "
                "Failing to do so can result in silent errors that might be hard to debug."
            )
        else:
            _check_sampling_rate(sampling_rate)
        clips = [self._resample(clip, sampling_rate) for clip in self._as_mono_clips(raw_speech)]
        features = [self._log_mel(clip) for clip in clips]

        num_frames = max(feature.shape[1] for feature in features)
        input_features = np.full((len(features), self.feature_size, num_frames), self.padding_value, np.float32)
        attention_mask = np.zeros((len(features), num_frames), dtype=np.int32)
        for index, feature in enumerate(features):
            input_features[index, :, : feature.shape[1]] = feature
            attention_mask[index, : feature.shape[1]] = 1

        data = {"input_features": input_features}
        if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
            data["attention_mask"] = attention_mask
        return BatchFeature(data, tensor_type=return_tensors)

    def _as_mono_clips(self, raw_speech) -> list[np.ndarray]:
        """A list of 1-D float32 clips, or a clear error for stereo, empty or non-finite audio."""
        if hasattr(raw_speech, "detach"):  # a torch tensor, without importing torch here
            raw_speech = raw_speech.detach().cpu().numpy()
        if isinstance(raw_speech, np.ndarray):
            if raw_speech.ndim > 2:
                raise ValueError(f"{type(self).__name__} takes mono audio only: a clip [samples] or a batch "
                                 f"[batch, samples], got an array of shape {raw_speech.shape}")
            clips = [raw_speech] if raw_speech.ndim == 1 else list(raw_speech)
        elif isinstance(raw_speech, list | tuple):
            is_batched = len(raw_speech) > 0 and not np.isscalar(raw_speech[0])
            clips = list(raw_speech) if is_batched else [raw_speech]
        else:
            raise TypeError(f"{type(self).__name__} expects a numpy array, torch tensor or list, got "
                            f"{type(raw_speech).__name__}")
        if len(clips) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch: pass at least one clip")

        mono_clips = []
        for index, clip in enumerate(clips):
            if hasattr(clip, "detach"):
                clip = clip.detach().cpu().numpy()
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1:
                raise ValueError(f"{type(self).__name__} takes mono audio only: clip {index} has shape "
                                 f"{clip.shape}; mix stereo down first, e.g. `audio.mean(axis=-1)`")
            if clip.size == 0:
                raise ValueError(f"{type(self).__name__} got an empty clip (index {index}): audio needs samples")
            if not np.isfinite(clip).all():
                raise ValueError(f"{type(self).__name__} got NaN or infinite samples in clip {index}")
            mono_clips.append(clip)
        return mono_clips

    def _resample(self, clip: np.ndarray, sampling_rate: int | None) -> np.ndarray:
        if sampling_rate is None or sampling_rate == self.sampling_rate:
            return clip
        # Polyphase filtering by the reduced ratio, e.g. 8 kHz -> 16 kHz is up=2, down=1: length scales exactly.
        divisor = gcd(int(sampling_rate), int(self.sampling_rate))
        up, down = self.sampling_rate // divisor, int(sampling_rate) // divisor
        return resample_poly(clip, up, down).astype(np.float32)

    def _log_mel(self, clip: np.ndarray) -> np.ndarray:
        """[n_mels, 1 + len(clip) // hop_length] Whisper-scaled log-mel of one clip."""
        # Zero padding at the edges (not reflection) so clips shorter than half a window still work.
        log_spec = spectrogram(
            clip,
            window_function(self.n_fft, "hann"),
            frame_length=self.n_fft,
            hop_length=self.hop_length,
            power=2.0,
            center=True,
            pad_mode="constant",
            mel_filters=self.mel_filters,
            mel_floor=1e-10,  # silence gives log10(1e-10) = -10, never -inf
            log_mel="log10",
        )
        # Whisper's scaling: keep 8 decades below the loudest bin, then map to roughly [-1, 1].
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)


# Rates recorded audio comes at: 8 kHz telephony to 768 kHz studio converters. Outside it the value is a mistake (a
# 1 Hz "rate" would upsample every clip 16,000-fold, gigabytes of samples, before anything else fails).
PLAUSIBLE_SAMPLING_RATES = (1_000, 768_000)


def _check_sampling_rate(sampling_rate) -> None:
    low, high = PLAUSIBLE_SAMPLING_RATES
    is_integral = isinstance(sampling_rate, int | np.integer) or (
        isinstance(sampling_rate, float | np.floating) and float(sampling_rate).is_integer()
    )
    if isinstance(sampling_rate, bool) or not is_integral:
        raise TypeError(f"sampling_rate must be a whole number of samples per second (e.g. 16000), got "
                        f"{sampling_rate!r} of type {type(sampling_rate).__name__}")
    if not low <= sampling_rate <= high:
        raise ValueError(f"sampling_rate {sampling_rate} Hz is not an audio rate: expected {low:,}-{high:,} Hz "
                         "(samples per second of the waveform you pass)")


AgillmFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")

__all__ = ["AgillmFeatureExtractor"]
