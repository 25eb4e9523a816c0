"""Ollama ``Modelfile`` beside a GGUF: FROM, the chat template in Ollama's Go-template syntax, stops, system prompt.

Each built-in template (:mod:`cnllm.core.templates`) has a Go template that renders the same text
from Ollama's ``.Messages`` (system messages included, as Ollama passes them; the Modelfile's
SYSTEM becomes the first message when a request has none). A model's own Jinja template (GGUF
``tokenizer.chat_template``, or ``tokenizer_config.json``) is translated when it renders exactly like
one of the built-ins on probe conversations; anything else asks for ``--template NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cnllm.core.errors import UsageError
from cnllm.core.templates import TEMPLATES, get_template, jinja_renderer

MODELFILE_SUFFIX = ".Modelfile"


def _go_template(system: str, user: str, assistant: str) -> str:
    """Ollama's loop over ``.Messages`` with one text per role (``{{ .Content }}`` inside each)."""
    return (
        "{{- range $i, $_ := .Messages }}\n"
        f'{{{{- if eq .Role "system" }}}}{system}'
        f'{{{{ else if eq .Role "user" }}}}{user}'
        f'{{{{ else if eq .Role "assistant" }}}}{assistant}'
        "{{ end }}\n"
        "{{- end }}"
    )


def go_template(name: str, eos_token: str) -> str:
    """The Go template equivalent to the built-in template ``name``, ``eos_token`` written where it writes one."""
    content = "{{ .Content }}"
    if name == "alpaca":
        return _go_template(f"{content}\n\n", f"### Instruction:\n{content}\n\n### Response: ", f"{content}{eos_token}")
    if name == "llama2":
        # The first user turn continues the [INST] the system block opened (index 1) or opens one (index 0);
        # later turns start a new sequence, as Meta's template does.
        user = f"{{{{ if eq $i 0 }}}}[INST] {{{{ else if gt $i 1 }}}}<s>[INST] {{{{ end }}}}{content} [/INST]"
        return _go_template(f"[INST] <<SYS>>\n{content}\n<</SYS>>\n\n", user, f" {content} {eos_token}")
    if name == "llama3":
        header = "<|start_header_id|>{}<|end_header_id|>\n\n"
        return _go_template(
            f"{header.format('system')}{content}<|eot_id|>",
            f"{header.format('user')}{content}<|eot_id|>{header.format('assistant')}",
            f"{content}<|eot_id|>",
        )
    if name == "chatml":
        return _go_template(
            f"<|im_start|>system\n{content}<|im_end|>\n", f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", f"{content}<|im_end|>\n"
        )
    raise UsageError(f"no Ollama template for {name!r}; choose one of {', '.join(TEMPLATES)}")


PROBES = (
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
)


def identify_template(jinja_source: str, *, bos_token: str = "<s>", eos_token: str = "</s>") -> str | None:
    """The built-in template a Jinja chat template renders exactly like on the probe conversations, if any."""
    render = jinja_renderer(jinja_source, bos_token=bos_token, eos_token=eos_token)
    try:
        rendered = [render(list(p), True) for p in PROBES]
    except UsageError:
        return None
    for name, template in TEMPLATES.items():
        if all(text in (template.render(p, eos_token=eos_token), bos_token + template.render(p, eos_token=eos_token)) for p, text in zip(PROBES, rendered)):
            return name
    return None


@dataclass
class ModelfilePlan:
    """What the Modelfile will say, settled before the GGUF is written."""

    path: Path
    template: str
    system: str | None
    source: str  # where the template came from: "--template", "GGUF tokenizer.chat_template", "tokenizer_config.json"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "template": self.template, "system": self.system, "template_from": self.source}


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.stem + MODELFILE_SUFFIX)


def hf_chat_template(model_dir: Path) -> str | None:
    """The Jinja chat template of a Hugging Face model folder (``chat_template.jinja`` or ``tokenizer_config.json``)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return template if isinstance(template, str) else None
    return None


def gguf_chat_template(path: Path) -> str | None:
    """``tokenizer.chat_template`` of a GGUF file, if it carries one."""
    import gguf

    try:
        field = gguf.GGUFReader(path).get_field("tokenizer.chat_template")
    except (ValueError, OSError, IndexError, KeyError):
        return None
    return None if field is None else field.contents()


def plan_modelfile(output: Path, *, template: str, system: str | None, jinja_source: str | None, source: str, force: bool) -> ModelfilePlan:
    """Resolve the template (``auto``: the model's Jinja template, translated) and check the Modelfile may be written."""
    from cnllm.core.atomic import check_output

    path = modelfile_path(output)
    check_output(path, force)
    if template != "auto":
        get_template(template)
        return ModelfilePlan(path, template, system, "--template")
    if not jinja_source:
        raise UsageError(f"the model carries no chat template ({source}); name one for the Modelfile with --template alpaca|llama2|llama3|chatml")
    name = identify_template(jinja_source)
    if name is None:
        raise UsageError(
            f"the model's chat template ({source}) is not one of the built-in templates, so it cannot be translated to Ollama's "
            "Go-template syntax; name the closest one with --template alpaca|llama2|llama3|chatml"
        )
    return ModelfilePlan(path, name, system, source)


def gguf_eos_token(path: Path) -> str:
    """The text of a GGUF's end-of-sequence token (written into alpaca / llama2 templates)."""
    import gguf

    reader = gguf.GGUFReader(path)
    eos = reader.get_field("tokenizer.ggml.eos_token_id")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if eos is None or tokens is None:
        return "</s>"
    return tokens.contents(int(eos.contents()))


def modelfile_text(gguf_name: str, template: str, *, eos_token: str, system: str | None) -> str:
    built_in = get_template(template)
    system = system if system is not None else built_in.default_system
    stops = list(dict.fromkeys([*built_in.stop, eos_token]))
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(template, eos_token)}"""', ""]
    if system:
        if '"""' in system:
            raise UsageError('the system prompt cannot contain """ (a Modelfile quotes it with them)')
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(plan: ModelfilePlan, gguf_path: Path) -> Path:
    """Write the planned Modelfile beside ``gguf_path`` (atomically), ``FROM`` it by relative name."""
    from cnllm.core.atomic import write_text

    text = modelfile_text(gguf_path.name, plan.template, eos_token=gguf_eos_token(gguf_path), system=plan.system)
    write_text(plan.path, text, force=True)
    return plan.path
