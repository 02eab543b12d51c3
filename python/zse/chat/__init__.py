"""Chats beyond plain text: tool calls (``tools``), thoughts (``<think>``) and
grammars that hold both, on top of the engine's chat template.

- `plan`: a chat request to the prompt, the grammar and the reply's parser;
- `tools`: OpenAI's tool fields, template families, the generic format, grammars;
- `reply`: a reply's text split into reasoning, content and tool calls, streaming;
- `jsonscan`: the incremental JSON scanner `reply` reads calls with.
"""

from .plan import ChatPlan
from .reply import CallDelta, ReplyDelta, ReplyParser, ToolCall
from .tools import Family

__all__ = ["CallDelta", "ChatPlan", "Family", "ReplyDelta", "ReplyParser", "ToolCall"]
