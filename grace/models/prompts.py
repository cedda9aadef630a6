"""The task prompts: the four instructions, and how they become one user turn of a chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import ProcessorMixin


@dataclass
class Prompts:
    """Instructions of the four tasks (chat-template user turns; the answer follows).

    Args:
        memorize (`str`, *optional*, defaults to `"Which identifier does this image have?"`):
            Image -> identifier; the prompt carries the image.
        retrieve (`str`, *optional*, defaults to `"Which image shows: {query}"`):
            Query -> identifier; ``{query}`` is replaced by the query text.
        describe (`str`, *optional*, defaults to `"Describe image {identifier}."`):
            Identifier -> caption; ``{identifier}`` is replaced by the image's identifier.
        caption (`str`, *optional*, defaults to `"Describe this image."`):
            Image -> caption; the prompt carries the image.
    """

    memorize: str = "Which identifier does this image have?"
    retrieve: str = "Which image shows: {query}"
    describe: str = "Describe image {identifier}."
    caption: str = "Describe this image."


def user_turn(processor: ProcessorMixin, text: str, with_image: bool) -> str:
    """The prompt string of one user turn through the backbone's own chat template."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def retrieve_turn(processor: ProcessorMixin, prompts: Prompts, query: str) -> str:
    """The prompt of a text query, the same in training and at retrieval.

    A user turn, or for a processor with ``query_words`` off (the lite backbone's default) a
    prompt whose words reach the model only through the processor's sentence feature.
    """
    text = prompts.retrieve.format(query=query)
    if getattr(processor, "query_words", True):
        return user_turn(processor, text, with_image=False)
    return processor.feature_query(text)
