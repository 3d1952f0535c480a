"""Media input: video / image / audio files -> the arrays Video-LLaMA takes (upstream preprocessing).

* ``load_video``: PyAV decoding with seek-based frame fetch, upstream sampling ("uniform", "headtail",
  "random"), 224x224 squash resize, ``alpro_video_eval`` / ``alpro_video_train`` -> ``Video`` with
  (T, 224, 224, 3) float32 CLIP-normalised frames (channels-last) + indices, timestamps, upstream message.
* ``load_image``: ``blip2_image_eval`` / ``blip2_image_train`` -> (224, 224, 3); ``image_as_video`` -> (1, ...).
* ``load_audio``: ImageBind audio preprocessing -> ``Audio`` with (8, 1, 128, 204) normalised fbank clips.
* ``load_batch``: many files, per-file error slot; ``load_video_with_audio``: both of one file, concurrently.

Every failure is a typed ``MediaError`` (``.path``, ``.reason``). Module docstrings of ``video`` and ``audio``
describe the decoding strategy and every upstream quirk that is reproduced (or deliberately not).
"""
from .audio import (
    FBANK_MEAN, FBANK_STD, TARGET_SAMPLE_RATE, Audio, clip_timepoints, decode_audio, kaldi_fbank, load_audio,
    mel_banks, resample, waveform_to_clips,
)
from .batch import BatchResult, load_batch, load_video_with_audio
from .errors import MediaError, NoAudioStreamError, NoVideoStreamError, TimeWindowError, UnreadableMediaError
from .image import (
    CLIP_MEAN, CLIP_STD, alpro_video_eval, alpro_video_train, bicubic_resize, blip2_image_eval, blip2_image_train,
    float_to_uint8, image_as_video, load_image, normalize_uint8, random_resized_crop_params,
)
from .video import (
    Video, VideoMeta, Window, decode_all_frames, load_video, load_video_uint8, sample_frame_indices, video_info,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "FBANK_MEAN", "FBANK_STD", "TARGET_SAMPLE_RATE",
    "MediaError", "NoAudioStreamError", "NoVideoStreamError", "TimeWindowError", "UnreadableMediaError",
    "Video", "VideoMeta", "Window", "load_video", "load_video_uint8", "decode_all_frames", "sample_frame_indices",
    "video_info",
    "load_image", "image_as_video", "blip2_image_eval", "blip2_image_train", "alpro_video_eval",
    "alpro_video_train", "normalize_uint8", "random_resized_crop_params", "bicubic_resize", "float_to_uint8",
    "Audio", "load_audio", "decode_audio", "kaldi_fbank", "mel_banks", "resample", "clip_timepoints",
    "waveform_to_clips",
    "BatchResult", "load_batch", "load_video_with_audio",
]
