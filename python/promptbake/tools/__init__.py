"""Tool baking's core: tools described, rendered as a prompt, called, executed and scored.

* ``spec``: ``ToolSpec`` (name, description, JSON Schema parameters, examples, test items),
  loaded from and saved to JSON, checked on load (``load_specs``, ``save_specs``).
* ``schema``: the JSON Schema subset and argument checking.
* ``calls``: ``Call``, the call syntaxes (``compact``: ``CALC(17 * 23)``; ``json``:
  ``<tool_call>{...}</tool_call>``), ``format_call`` and ``parse`` with failure classes.
* ``rendering``: ``render(specs, tokenizer, syntax=...)``, the prompt u as chat messages.
* ``registry``: ``Registry`` runs registered tools only, with a timeout and an output limit.
* ``calculator``, ``units``, ``dates``, ``lookup``: the shipped offline tools; ``shipped``:
  their specs, registry, held-out test items and training contexts.
* ``matching``: calls scored as the Berkeley Function Calling Leaderboard's AST checker does.
* ``evaluation``: ``ToolUse``, the tool-use Evaluator (scored by one of ``METRICS``), and
  ``metrics`` / ``paired``.

::

    from promptbake import models, tools

    model, tokenizer, _ = models.load(None)
    u = tools.render(tools.shipped.specs(), tokenizer)      # messages: system + demonstrations
    evaluator = tools.ToolUse()                             # shipped tools, held-out items
    base, prompted = evaluator(model, tokenizer), evaluator(model, tokenizer, u)
    print(tools.metrics(prompted)["call_accuracy"], tools.paired(base, prompted))
"""

from promptbake.tools import shipped
from promptbake.tools.calls import (
    COMPACT,
    JSON,
    SYNTAXES,
    Attempt,
    Call,
    Parsed,
    format_call,
    parse,
)
from promptbake.tools.evaluation import (METRICS, Exchange, ToolUse, answer_passes, converse,
                                         metrics, paired)
from promptbake.tools.matching import Match, match
from promptbake.tools.registry import Registry, ToolError, ToolResult
from promptbake.tools.rendering import render, result_role, supports_tools, tool_turns
from promptbake.tools.schema import Problem, SchemaError, check_arguments
from promptbake.tools.spec import Example, SpecError, ToolSpec, load_specs, save_specs

__all__ = [
    "COMPACT",
    "JSON",
    "METRICS",
    "SYNTAXES",
    "Attempt",
    "Call",
    "Example",
    "Exchange",
    "Match",
    "Parsed",
    "Problem",
    "Registry",
    "SchemaError",
    "SpecError",
    "ToolError",
    "ToolResult",
    "ToolSpec",
    "ToolUse",
    "answer_passes",
    "converse",
    "check_arguments",
    "format_call",
    "load_specs",
    "match",
    "metrics",
    "paired",
    "parse",
    "render",
    "result_role",
    "save_specs",
    "shipped",
    "supports_tools",
    "tool_turns",
]
