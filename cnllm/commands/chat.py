"""``cnllm chat``: talk to a model in the terminal, or answer prompts from a script."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Callable, List, Optional, TextIO

import typer

from cnllm.cli import output
from cnllm.cli.options import JsonOpt, ModelArg, NCtxOpt, TemplateOpt, VerboseOpt, warn_beyond_trained, with_model_loading
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import Completion, GenerationStream, LoadOptions, SamplingParams

REPL_HELP = """commands:
  /help            this help
  /clear           forget the conversation (the system prompt stays)
  /system TEXT     set the system prompt (and clear the conversation); /system alone shows it
  /params [K=V…]   show or set sampling parameters, e.g. /params temperature=0.2 max_tokens=128
  /save FILE       save the conversation as JSON
  /load FILE       load a saved conversation
  /exit            leave (Ctrl-D too); Ctrl-C stops the current answer"""


def status_line(result: Completion) -> str:
    parts = [f"{result.completion_tokens} tokens"]
    if result.tokens_per_second:
        parts.append(f"{result.tokens_per_second:.1f} tokens/s")
    if result.time_to_first_token is not None:
        parts.append(f"first token {result.time_to_first_token:.2f} s")
    parts.append(f"finish: {result.finish_reason}")
    if result.speculative and result.speculative.acceptance_rate is not None:
        parts.append(f"draft accepted {result.speculative.acceptance_rate:.0%}")
    return "[" + ", ".join(parts) + "]"


def result_document(prompt: str, result: Completion) -> dict:
    speculative = result.speculative
    return {
        "prompt": prompt,
        "answer": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "seconds": round(result.seconds, 4),
        "time_to_first_token": None if result.time_to_first_token is None else round(result.time_to_first_token, 4),
        "tokens_per_second": None if result.tokens_per_second is None else round(result.tokens_per_second, 2),
        "speculative": None
        if speculative is None
        else {"proposed": speculative.proposed, "accepted": speculative.accepted, "acceptance_rate": speculative.acceptance_rate},
    }


def stream_to(stream: GenerationStream, out: TextIO) -> Completion:
    """Write the answer as it comes; Ctrl-C stops it (the partial answer is kept)."""
    try:
        for text in stream:
            out.write(text)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        stream.completion.finish_reason = "interrupted"
    out.write("\n")
    out.flush()
    return stream.completion


def set_params(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    values = asdict(params)
    settable = [key for key in values if key != "json_schema"]  # a schema comes from --json-schema FILE
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in settable:
            raise UsageError(f"/params takes KEY=VALUE with KEY one of {', '.join(settable)}; got {assignment!r}")
        if key == "stop":
            values[key] = tuple(s for s in raw.split(",") if s)
        elif key in ("max_tokens", "seed"):
            values[key] = None if raw.lower() in ("", "none") else int(raw)
        elif key == "top_k":
            values[key] = int(raw)
        else:
            values[key] = float(raw)
    updated = SamplingParams(**values)
    updated.validate()
    return updated


def run_repl(session, read: Callable[[str], str], out: TextIO, note: Callable[[str], None]) -> None:
    """The interactive loop; ``read`` is ``input`` on a terminal (tests inject lines, EOFError ends it)."""
    from cnllm.core.errors import CnllmError

    note("type a message; /help for commands, Ctrl-D to leave")
    while True:
        try:
            line = read("> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            try:
                if command in ("/exit", "/quit"):
                    return
                if command == "/help":
                    note(REPL_HELP)
                elif command == "/clear":
                    session.clear()
                    note("conversation cleared")
                elif command == "/system":
                    if argument:
                        session.system = argument
                        session.clear()
                        note("system prompt set; conversation cleared")
                    else:
                        note(f"system prompt: {session.system!r}")
                elif command == "/params":
                    if argument:
                        session.params = set_params(session.params, argument.split())
                    note("  ".join(f"{k}={v}" for k, v in asdict(session.params).items()))
                elif command == "/save":
                    if not argument:
                        raise UsageError("/save needs a file name")
                    session.save(Path(argument))
                    note(f"saved {len(session.history) // 2} turns to {argument}")
                elif command == "/load":
                    if not argument:
                        raise UsageError("/load needs a file name")
                    session.load(Path(argument))
                    note(f"loaded {len(session.history) // 2} turns from {argument}")
                else:
                    note(f"unknown command {command}; /help lists them")
            except (CnllmError, ValueError) as exc:
                note(f"error: {getattr(exc, 'message', exc)}")
            continue
        try:
            dropped = session.dropped_turns
            stream = session.ask(text)
        except CnllmError as exc:
            note(f"error: {exc.message}")
            continue
        if session.dropped_turns > dropped:
            note(f"(dropped {session.dropped_turns - dropped} oldest turns to fit the context window)")
        result = stream_to(stream, out)
        session.record(text, result.text)
        note(status_line(result))


def read_stdin_text() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it first, e.g. with iconv") from None


@with_model_loading
def chat(
    model: ModelArg,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this prompt once and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (default: the template's).")] = None,
    template: TemplateOpt = "auto",
    whole_input: Annotated[bool, typer.Option("--whole-input", help="With stdin not a terminal: all of it is one prompt (default: one prompt per line).")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="Longest answer in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0, help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0, max=1, help="Nucleus sampling mass.")] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0: all).")] = 40,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", min=0, help="Penalise repeated tokens (1: off).")] = 1.1,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed, for reproducible sampling.")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop the answer at this text (repeatable).")] = None,
    json_schema: Annotated[
        Optional[Path],
        typer.Option("--json-schema", exists=True, dir_okay=False, help="Answer JSON that this JSON-schema file accepts (GGUF: a llama.cpp grammar)."),
    ] = None,
    n_ctx: NCtxOpt = None,
    draft_model: Annotated[Optional[Path], typer.Option("--draft-model", help="A small model with the same vocabulary for speculative decoding.")] = None,
    draft_tokens: Annotated[int, typer.Option("--draft-tokens", min=1, help="Tokens the draft model proposes per step.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No status line on stderr.")] = False,
    verbose: VerboseOpt = False,
    json_: JsonOpt = False,
    load: LoadOptions = LoadOptions(),
) -> None:
    """Chat with a model (GGUF via llama.cpp, or a Hugging Face directory via transformers).

    On a terminal: an interactive chat (/help for commands). From scripts: --prompt TEXT, or prompts on stdin
    (one per line, or all of it with --whole-input); only the answer goes to stdout.

    Example: cnllm chat chinese-alpaca-q4.gguf --template alpaca -p "用一句话介绍北京"
    """
    from cnllm.core.backends import load_model
    from cnllm.core.files import read_json_object
    from cnllm.core.generation.session import ChatSession

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        json_schema=read_json_object(json_schema) if json_schema is not None else None,
    )
    params.validate()
    interactive = prompt is None and sys.stdin.isatty()
    if json_ and interactive:
        raise UsageError("--json needs --prompt or prompts on stdin (it is for scripts, not the interactive chat)")
    prompts: list[str] = []
    if prompt is not None:
        prompts = [prompt]
    elif not interactive:
        text = read_stdin_text()
        prompts = [text] if whole_input else [line for line in text.splitlines() if line.strip()]
        if not prompts or not "".join(prompts).strip():
            raise UsageError("no prompt: stdin is empty (pass --prompt TEXT or pipe text in)")
    if draft_model is not None and not draft_model.exists():
        raise UsageError(f"--draft-model {draft_model} does not exist")
    options = replace(load, n_ctx=n_ctx, draft_model=draft_model, draft_tokens=draft_tokens, verbose=verbose)
    with load_model(model, options) as generator:
        warn_beyond_trained(generator.context_length, generator.trained_context, options.rope)
        generator.check_sampling(params)  # a schema without a grammar, or a backend without grammars: before the first prompt
        prompt_format = generator.prompt_format(template)
        if prompt_format.is_plain and template == "auto":
            output.print_note(f"note: {model} has no chat template; prompts are plain continuation, as with --template none (choose one with --template)")
        session = ChatSession(generator, prompt_format, params, system=system)
        if interactive:
            try:
                import readline  # noqa: F401 - line editing and history for input()
            except ImportError:
                pass
            run_repl(session, input, sys.stdout, output.print_note)
            return
        documents = []
        for text in prompts:
            session.clear()
            stream = session.ask(text)
            if json_:
                result = stream.read()
                documents.append(result_document(text, result))
            else:
                result = stream_to(stream, sys.stdout)
                if not quiet:
                    output.print_note(status_line(result))
        if json_:
            about = {"model": str(model), "backend": generator.backend, "template": prompt_format.name}
            single = prompt is not None or whole_input
            output.print_json({**about, **documents[0]} if single else {**about, "results": documents})
