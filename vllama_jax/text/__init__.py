"""Text layer: tokenizers with media placeholders, conversation templates, upstream prompt/label construction.

The package re-exports the public names of its three modules (``__all__``).
"""
from .tokenizer import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    PLACEHOLDERS,
    HFTokenizer,
    LlamaSPTokenizer,
    Tokenizer,
    TokenizerError,
)
from .tokenizer_files import load_tokenizer, read_gguf_metadata
from .conversation import (
    AUDIO_VIDEO_UPLOAD_MESSAGE,
    DEMO_SYSTEM_AUDIOVIDEO,
    DEMO_SYSTEM_IMAGE,
    DEMO_SYSTEM_VIDEO,
    IMAGE_UPLOAD_MESSAGE,
    TEMPLATES,
    Conversation,
    SeparatorStyle,
    answer_from_ids,
    ask,
    chat_prompt,
    frame_time_message,
    get_template,
    postprocess_answer,
    prompt_segments,
    render_chat_template,
    segment_token_ids,
    stop_token_sequences,
    upload,
    video_upload_message,
)
from .instruct import (
    ALIGNMENT_PROMPTS,
    IGNORE_INDEX,
    STAGE2_END_SYM,
    STAGE2_PROMPT_TEMPLATE,
    blip_caption,
    caption_targets,
    caption_tokens,
    chat_instruction_sample,
    collate_instruction,
    insert_placeholders,
    instruction_sample,
    prompt_wrap_ids,
    split_prompt,
    stage2_prompt_list,
    videochat_turns,
)

__all__ = [
    "AUDIO_PLACEHOLDER", "IMAGE_PLACEHOLDER", "PLACEHOLDERS", "HFTokenizer", "LlamaSPTokenizer", "Tokenizer",
    "TokenizerError", "load_tokenizer", "read_gguf_metadata", "AUDIO_VIDEO_UPLOAD_MESSAGE",
    "DEMO_SYSTEM_AUDIOVIDEO", "DEMO_SYSTEM_IMAGE", "DEMO_SYSTEM_VIDEO", "IMAGE_UPLOAD_MESSAGE", "TEMPLATES",
    "Conversation", "SeparatorStyle", "answer_from_ids", "ask", "chat_prompt", "frame_time_message", "get_template",
    "postprocess_answer", "prompt_segments", "render_chat_template", "segment_token_ids", "stop_token_sequences",
    "upload", "video_upload_message", "ALIGNMENT_PROMPTS", "IGNORE_INDEX", "STAGE2_END_SYM",
    "STAGE2_PROMPT_TEMPLATE", "blip_caption", "caption_targets", "caption_tokens", "chat_instruction_sample",
    "collate_instruction", "insert_placeholders", "instruction_sample", "prompt_wrap_ids", "split_prompt",
    "stage2_prompt_list", "videochat_turns",
]
