"""Chat templates: where they come from, the Gemma 4 fallback, and the sandbox against hostile templates."""

import json

import pytest

from dgrun.chat_template import GEMMA4, choose, render
from dgrun.errors import DgrunError
from dgrun.tokenizer import find
from gemma_vocab import make_gemma_tokenizer

MESSAGES = [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]

HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",  # jinja would render an empty string; dgrun refuses at once
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].system('true') }}",
    "{{ messages.__class__.__base__ }}",
    "{{ 'x'|attr('__class__') }}",
    "{{ '{0.__class__}'.format('x') }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}",
    "{% include '/etc/passwd' %}",
    "{% extends 'base.html' %}",
    "{% import 'macros' as m %}",
]

# Templates that would run for ever or build gigabytes (benchmarks/chat_template_bounds.py measures them).
RUNAWAY = [
    "{{ range(10**9) | list | length }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{{ 'x' * 10**10 }}",
    "{{ (range(1000) | list) * 10**6 }}",
    "{{ 'x'.ljust(10**10) }}",
    "{{ 'x' | center(10**10) }}",
    "{{ ('x' * 99999) | replace('x', 'y' * 99999) }}",
    "{{ ('x' * 99999).replace('x', 'y' * 99999) }}",
    "{{ '%0999999999d' | format(1) }}",
    "{{ '{:>9999999999}'.format(1) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% for i in range(99999) %}{% for j in range(99) %}{{ 'y' * 999 }}{% endfor %}{% endfor %}",
]


def test_gemma4_fallback_format():
    want = ("<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n"
            "<|turn>user\n2+2?<turn|>\n<|turn>model\n")
    assert render(GEMMA4, MESSAGES, True, bos_token="<bos>") == want
    assert render(GEMMA4, MESSAGES[1:2], False, bos_token="<bos>") == "<bos><|turn>user\nHi<turn|>\n"
    t = choose(None)
    assert t.fallback and t.text == GEMMA4 and "Gemma 4" in t.source


@pytest.mark.parametrize("template", HOSTILE)
def test_sandbox_blocks_escapes(template):
    with pytest.raises(DgrunError, match="blocked"):
        render(template, [dict(m) for m in MESSAGES])


@pytest.mark.parametrize("template", RUNAWAY)
def test_runaway_templates_stop_within_bounds(template, monkeypatch):
    import resource
    import time

    import dgrun.chat_template as ct

    monkeypatch.setattr(ct, "TIME_LIMIT", 0.5)
    peak0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(DgrunError, match="chat template (stopped|blocked)") as e:
        render(template, MESSAGES)
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 2.0
    # ru_maxrss is in KiB: the render may not raise the process's peak by much more than MEMORY_LIMIT
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 2 * ct.MEMORY_LIMIT // 1024


def test_budget_leaves_real_templates_alone():
    long = [{"role": "user" if i % 2 else "assistant", "content": "word " * 2000} for i in range(200)]
    out = render(GEMMA4, long, True, bos_token="<bos>")
    assert len(out) > 2_000_000 and out.endswith("<|turn>model\n")


def test_template_errors_are_one_line():
    for template, needle in [("{% for %}", "chat template error"), ("{{ raise_exception('no system role') }}",
                                                                       "no system role"),
                             ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError")]:
        with pytest.raises(DgrunError, match=needle) as e:
            render(template, MESSAGES)
        assert "\n" not in str(e.value)


def test_transformers_helpers():
    out = render("{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}", [{"role": "user", "content": "é"}])
    assert out == '{"role": "user", "content": "é"}|4'


def test_sources_and_precedence(tmp_path):
    path = make_gemma_tokenizer(tmp_path / "m")  # tokenizer_config.json holds a template
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert find(path).chat_template == config["chat_template"]
    assert find(path).template_source.endswith("tokenizer_config.json")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": "FROM JSON"}))
    assert find(path).chat_template == "FROM JSON"
    (path / "chat_template.jinja").write_text("FROM JINJA")
    assert find(path).chat_template == "FROM JINJA"
    for name in ("chat_template.jinja", "chat_template.json"):
        (path / name).unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEF"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert find(path).chat_template == "DEF"
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert choose(find(path)).fallback


def test_override_file(tmp_path):
    (tmp_path / "t.jinja").write_text("OVERRIDE {{ messages | length }}")
    t = choose(find(make_gemma_tokenizer(tmp_path / "m")), tmp_path / "t.jinja")
    assert not t.fallback and t.render(MESSAGES) == "OVERRIDE 4"
    with pytest.raises(DgrunError, match="--chat-template"):
        choose(None, tmp_path / "missing.jinja")
