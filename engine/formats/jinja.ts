// Chat-template renderer with the semantics transformers gets from Python's jinja2 (ImmutableSandboxedEnvironment,
// trim_blocks, lstrip_blocks, loopcontrols, its AssistantTracker for {% generation %}, raise_exception, tojson,
// strftime_now). @huggingface/jinja lexes and parses (its AST is all we take from it); evaluation is ours because
// its runtime prints Python values as JSON, ignores strip(chars), lacks reject, compares dicts by identity and
// drops {% generation %} spans — each changes the rendered text or the assistant mask.
import { parse, tokenize } from '@huggingface/jinja';
import {
  Namespace, PyFloat, PyFunc, PyTuple, TemplateError, Undefined, isDict, isInt, isNum, numVal, pyChars, pyCompare, pyEq,
  pyStr, pyTruthy, sliceIndices, toPy, typeName,
} from './jinja-values.ts';
import type { Kwargs } from './jinja-values.ts';
import { applyFilter, applyTest, getAttr, getItem, pyContains, pyIter } from './jinja-filters.ts';
import type { FilterContext } from './jinja-filters.ts';

export { TemplateError } from './jinja-values.ts';

/** A parsed node as @huggingface/jinja's parser builds it (we read fields by node type). */
interface Node {
  type: string;
  [field: string]: unknown;
}

const GENERATION_FN = '__swarmtune_generation__';

export interface RenderResult {
  text: string;
  /** [start, end) of every {% generation %} block in `text`, UTF-16 offsets, in render order */
  generation: [number, number][];
}

class BreakSignal {}
class ContinueSignal {}

class Scope {
  readonly vars = new Map<string, unknown>();
  readonly parent: Scope | null;
  constructor(parent: Scope | null) { this.parent = parent; }
  lookup(name: string): unknown {
    for (let s: Scope | null = this; s; s = s.parent) if (s.vars.has(name)) return s.vars.get(name);
    return new Undefined(`'${name}'`);
  }
}

class Out {
  parts: string[] = [];
  length = 0;
  write(s: string): void {
    if (s.length === 0) return;
    this.parts.push(s);
    this.length += s.length;
  }
  text(): string {
    return this.parts.join('');
  }
}

/** Python's time.strftime for the directives chat templates use (%d %b %B %Y %m %H %M %S %y %a %A %j %p %I %%). */
function strftime(fmt: string, d: Date): string {
  const MON = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'];
  const DAY = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
  const p2 = (n: number): string => String(n).padStart(2, '0');
  return fmt.replace(/%(.)/g, (m, c: string) => {
    switch (c) {
      case 'd': return p2(d.getDate());
      case 'b': return MON[d.getMonth()].slice(0, 3);
      case 'B': return MON[d.getMonth()];
      case 'm': return p2(d.getMonth() + 1);
      case 'Y': return String(d.getFullYear());
      case 'y': return p2(d.getFullYear() % 100);
      case 'H': return p2(d.getHours());
      case 'I': return p2(((d.getHours() + 11) % 12) + 1);
      case 'M': return p2(d.getMinutes());
      case 'S': return p2(d.getSeconds());
      case 'p': return d.getHours() < 12 ? 'AM' : 'PM';
      case 'a': return DAY[d.getDay()].slice(0, 3);
      case 'A': return DAY[d.getDay()];
      case 'j': return String(Math.floor((d.getTime() - new Date(d.getFullYear(), 0, 1).getTime()) / 864e5) + 1).padStart(3, '0');
      case '%': return '%';
      default: throw new TemplateError(`strftime_now: unsupported directive ${m}`);
    }
  });
}

export interface ChatTemplateOptions {
  /** clock for strftime_now (tests pin it) */
  now?: () => Date;
}

export class ChatTemplate {
  readonly source: string;
  /** the template marks assistant output with {% generation %} … {% endgeneration %} */
  readonly hasGenerationMarkers: boolean;
  private readonly program: Node;
  private readonly now: () => Date;

  constructor(source: string, opts: ChatTemplateOptions = {}) {
    this.source = source;
    this.now = opts.now ?? (() => new Date());
    // {% generation %} becomes a call block (same whitespace control, trim_blocks and lstrip_blocks apply to
    // block tags alike) so it survives the lexer, which would otherwise delete the tags
    const re = /\{%(-?)\s*(end)?generation\s*(-?)%\}/g;
    this.hasGenerationMarkers = re.test(source);
    const src = source.replace(re, (_, l: string, end: string | undefined, r: string) =>
      end ? `{%${l} endcall ${r}%}` : `{%${l} call ${GENERATION_FN}() ${r}%}`);
    try {
      this.program = parse(tokenize(src, { lstrip_blocks: true, trim_blocks: true })) as unknown as Node;
    } catch (e) {
      throw new TemplateError(`does not parse: ${(e as Error).message}`);
    }
  }

  render(vars: Record<string, unknown>): RenderResult {
    return new Render(this.now).run(this.program, vars);
  }
}

class Render implements FilterContext {
  private readonly root = new Out();
  private readonly generation: [number, number][] = [];
  private readonly now: () => Date;

  constructor(now: () => Date) {
    this.now = now;
  }

  run(program: Node, vars: Record<string, unknown>): RenderResult {
    const g = new Scope(null);
    const set = (k: string, v: unknown): void => { g.vars.set(k, v); };
    for (const [k, v] of [['true', true], ['false', false], ['none', null], ['True', true], ['False', false], ['None', null]] as const) set(k, v);
    set('raise_exception', new PyFunc('raise_exception', (a) => { throw new TemplateError(pyStr(a[0])); }));
    set('strftime_now', new PyFunc('strftime_now', (a) => strftime(pyStr(a[0]), this.now())));
    set('range', new PyFunc('range', (a) => {
      const [start, stop, step] = a.length === 1 ? [0, Number(a[0]), 1] : [Number(a[0]), Number(a[1]), a.length > 2 ? Number(a[2]) : 1];
      if (step === 0) throw new TemplateError('range() arg 3 must not be zero');
      const out: number[] = [];
      for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
      return out;
    }));
    set('namespace', new PyFunc('namespace', (a, kw) => {
      const m = new Map<string, unknown>();
      if (a.length > 0 && isDict(a[0])) for (const [k, v] of a[0]) m.set(String(k), v);
      for (const [k, v] of kw) m.set(k, v);
      return new Namespace(m);
    }));
    set('dict', new PyFunc('dict', (a, kw) => new Map<unknown, unknown>([...(a.length && isDict(a[0]) ? a[0] : []), ...kw])));
    const scope = new Scope(g);
    for (const [k, v] of Object.entries(vars)) scope.vars.set(k, toPy(v));
    this.exec((program.body as Node[]), scope, this.root);
    return { text: this.root.text(), generation: this.generation };
  }

  // ---- statements ----

  private exec(stmts: Node[], scope: Scope, out: Out): void {
    for (const s of stmts) this.stmt(s, scope, out);
  }

  private capture(stmts: Node[], scope: Scope): string {
    const o = new Out();
    this.exec(stmts, scope, o);
    return o.text();
  }

  private stmt(n: Node, scope: Scope, out: Out): void {
    switch (n.type) {
      case 'Comment': return;
      case 'If':
        return this.exec((pyTruthy(this.expr(n.test as Node, scope)) ? n.body : n.alternate) as Node[], scope, out);
      case 'For': return this.forLoop(n, scope, out);
      case 'Break': throw new BreakSignal();
      case 'Continue': throw new ContinueSignal();
      case 'Set': {
        const value = n.value ? this.expr(n.value as Node, scope) : this.capture(n.body as Node[], new Scope(scope));
        return this.assign(n.assignee as Node, value, scope);
      }
      case 'Macro': {
        const name = (n.name as Node).value as string;
        scope.vars.set(name, this.macro(name, n.args as Node[], n.body as Node[], scope));
        return;
      }
      case 'CallStatement': return this.callBlock(n, scope, out);
      case 'FilterStatement': {
        const body = this.capture(n.body as Node[], new Scope(scope));
        out.write(pyStr(this.filterNode(body, n.filter as Node, scope)));
        return;
      }
      default:
        out.write(pyStr(this.expr(n, scope)));
    }
  }

  private assign(target: Node, value: unknown, scope: Scope): void {
    if (target.type === 'Identifier') {
      scope.vars.set(target.value as string, value);
    } else if (target.type === 'TupleLiteral') {
      const names = target.value as Node[];
      const items = pyIter(value);
      if (items.length !== names.length) throw new TemplateError(`cannot unpack ${items.length} values into ${names.length} names`);
      names.forEach((t, i) => this.assign(t, items[i], scope));
    } else if (target.type === 'MemberExpression') {
      const obj = this.expr(target.object as Node, scope);
      if (!(obj instanceof Namespace)) throw new TemplateError(`cannot assign attribute on non-namespace object (${typeName(obj)})`);
      obj.map.set((target.property as Node).value as string, value);
    } else throw new TemplateError(`cannot assign to ${target.type}`);
  }

  private forLoop(n: Node, scope: Scope, out: Out): void {
    let iterNode = n.iterable as Node;
    let cond: Node | null = null;
    if (iterNode.type === 'SelectExpression') {
      cond = iterNode.test as Node;
      iterNode = iterNode.lhs as Node;
    }
    const loopScope = new Scope(scope);
    let items = pyIter(this.expr(iterNode, loopScope));
    if (cond) {
      items = items.filter((item) => {
        const s = new Scope(loopScope);
        this.assign(n.loopvar as Node, item, s);
        return pyTruthy(this.expr(cond, s));
      });
    }
    if (items.length === 0) {
      this.exec(n.defaultBlock as Node[], loopScope, out);
      return;
    }
    for (let i = 0; i < items.length; i++) {
      const s = new Scope(loopScope);
      const L = items.length;
      s.vars.set('loop', new Map<unknown, unknown>([
        ['index', i + 1], ['index0', i], ['revindex', L - i], ['revindex0', L - i - 1], ['first', i === 0], ['last', i === L - 1],
        ['length', L], ['depth', 1], ['depth0', 0],
        ['previtem', i > 0 ? items[i - 1] : new Undefined("'loop.previtem'")],
        ['nextitem', i < L - 1 ? items[i + 1] : new Undefined("'loop.nextitem'")],
        ['cycle', new PyFunc('cycle', (a) => a[i % a.length])],
      ]));
      this.assign(n.loopvar as Node, items[i], s);
      try {
        this.exec(n.body as Node[], s, out);
      } catch (e) {
        if (e instanceof BreakSignal) break;
        if (e instanceof ContinueSignal) continue;
        throw e;
      }
    }
  }

  private macro(name: string, params: Node[], body: Node[], defScope: Scope): PyFunc {
    return new PyFunc(name, (args, kw) => {
      const s = new Scope(defScope);
      const extra: unknown[] = [];
      const kwLeft = new Map(kw);
      if (kwLeft.has('caller')) {
        s.vars.set('caller', kwLeft.get('caller'));
        kwLeft.delete('caller');
      }
      params.forEach((p, i) => {
        const pname = (p.type === 'Identifier' ? p.value : (p.key as Node).value) as string;
        if (i < args.length) s.vars.set(pname, args[i]);
        else if (kwLeft.has(pname)) { s.vars.set(pname, kwLeft.get(pname)); kwLeft.delete(pname); }
        else s.vars.set(pname, p.type === 'Identifier' ? new Undefined(`'${pname}'`) : this.expr(p.value as Node, s));
      });
      for (let i = params.length; i < args.length; i++) extra.push(args[i]);
      s.vars.set('varargs', extra);
      s.vars.set('kwargs', new Map<unknown, unknown>(kwLeft));
      return this.capture(body, s);
    });
  }

  private callBlock(n: Node, scope: Scope, out: Out): void {
    const call = n.call as Node;
    const callee = call.callee as Node;
    if (callee.type === 'Identifier' && callee.value === GENERATION_FN) {
      // AssistantTracker: the block's text, at the root output's length when it ends (transformers records the
      // span there even when the block sits inside buffered output such as a macro)
      const rv = this.capture(n.body as Node[], new Scope(scope));
      this.generation.push([this.root.length, this.root.length + rv.length]);
      out.write(rv);
      return;
    }
    const fnv = this.expr(callee, scope);
    if (!(fnv instanceof PyFunc)) throw new TemplateError(`${typeName(fnv)} is not callable`);
    const [args, kw] = this.args(call.args as Node[], scope);
    kw.set('caller', this.macro('caller', (n.callerArgs as Node[] | null) ?? [], n.body as Node[], scope));
    out.write(pyStr(fnv.call(args, kw)));
  }

  // ---- expressions ----

  private args(nodes: Node[], scope: Scope): [unknown[], Kwargs] {
    const args: unknown[] = [];
    const kw: Kwargs = new Map();
    for (const a of nodes) {
      if (a.type === 'KeywordArgumentExpression') kw.set((a.key as Node).value as string, this.expr(a.value as Node, scope));
      else if (a.type === 'SpreadExpression') args.push(...pyIter(this.expr(a.argument as Node, scope)));
      else if (a.type === 'KeywordSpreadExpression') {
        const d = this.expr(a.argument as Node, scope);
        if (!isDict(d)) throw new TemplateError(`argument after ** must be a mapping, not ${typeName(d)}`);
        for (const [k, v] of d) kw.set(String(k), v);
      } else args.push(this.expr(a, scope));
    }
    return [args, kw];
  }

  filter(name: string, value: unknown, args: unknown[], kw: Kwargs): unknown {
    return applyFilter(this, name, value, args, kw);
  }

  test(name: string, value: unknown, args: unknown[]): boolean {
    return applyTest(name, value, args);
  }

  private filterNode(value: unknown, f: Node, scope: Scope): unknown {
    if (f.type === 'Identifier') return this.filter(f.value as string, value, [], new Map());
    const [args, kw] = this.args(f.args as Node[], scope);
    return this.filter((f.callee as Node).value as string, value, args, kw);
  }

  private expr(n: Node, scope: Scope): unknown {
    switch (n.type) {
      case 'StringLiteral': return n.value;
      case 'IntegerLiteral': return n.value;
      case 'FloatLiteral': return new PyFloat(n.value as number);
      case 'ArrayLiteral': return (n.value as Node[]).map((x) => this.expr(x, scope));
      case 'TupleLiteral': return PyTuple.fromList((n.value as Node[]).map((x) => this.expr(x, scope)));
      case 'ObjectLiteral': {
        const m = new Map<unknown, unknown>();
        for (const [k, v] of n.value as Map<Node, Node>) m.set(this.expr(k, scope), this.expr(v, scope));
        return m;
      }
      case 'Identifier': return scope.lookup(n.value as string);
      case 'MemberExpression': return this.member(n, scope);
      case 'CallExpression': {
        const f = this.expr(n.callee as Node, scope);
        if (f instanceof Undefined) throw new TemplateError(`${f.hint} is undefined`);
        if (!(f instanceof PyFunc)) throw new TemplateError(`'${typeName(f)}' object is not callable`);
        const [args, kw] = this.args(n.args as Node[], scope);
        return f.call(args, kw);
      }
      case 'FilterExpression': return this.filterNode(this.expr(n.operand as Node, scope), n.filter as Node, scope);
      case 'TestExpression': {
        const r = this.test((n.test as Node).value as string, this.expr(n.operand as Node, scope), []);
        return n.negate ? !r : r;
      }
      case 'UnaryExpression': {
        const op = (n.operator as Node).value as string;
        const v = this.expr(n.argument as Node, scope);
        if (op === 'not') return !pyTruthy(v);
        if (!isNum(v)) throw new TemplateError(`bad operand type for unary ${op}: '${typeName(v)}'`);
        const x = op === '-' ? -numVal(v) : numVal(v);
        return v instanceof PyFloat ? new PyFloat(x) : x;
      }
      case 'BinaryExpression': return this.binary(n, scope);
      case 'Ternary':
        return pyTruthy(this.expr(n.condition as Node, scope)) ? this.expr(n.trueExpr as Node, scope) : this.expr(n.falseExpr as Node, scope);
      case 'SelectExpression':
        return pyTruthy(this.expr(n.test as Node, scope)) ? this.expr(n.lhs as Node, scope) : new Undefined('the value of a false inline if');
      default:
        throw new TemplateError(`unsupported expression ${n.type}`);
    }
  }

  private member(n: Node, scope: Scope): unknown {
    const obj = this.expr(n.object as Node, scope);
    const prop = n.property as Node;
    if (n.computed && prop.type === 'SliceExpression') {
      const num = (x: unknown): number | null => {
        const v = x === undefined ? null : this.expr(x as Node, scope);
        if (v === null || v instanceof Undefined) return null;
        if (!isInt(v)) throw new TemplateError(`slice indices must be integers or None, not ${typeName(v)}`);
        return v;
      };
      if (obj instanceof Undefined) throw new TemplateError(`${obj.hint} is undefined`);
      const seq = typeof obj === 'string' ? pyChars(obj) : Array.isArray(obj) ? obj : null;
      if (seq === null) throw new TemplateError(`'${typeName(obj)}' object is not subscriptable`);
      const picked = sliceIndices(seq.length, num(prop.start), num(prop.stop), num(prop.step)).map((i) => seq[i]);
      if (typeof obj === 'string') return picked.join('');
      return obj instanceof PyTuple ? PyTuple.fromList(picked) : picked;
    }
    if (n.computed) return getItem(obj, this.expr(prop, scope), describe(n));
    if (prop.type === 'IntegerLiteral') return getItem(obj, prop.value, describe(n));
    return getAttr(obj, prop.value as string, describe(n));
  }

  private binary(n: Node, scope: Scope): unknown {
    const op = (n.operator as Node).value as string;
    const l = this.expr(n.left as Node, scope);
    if (op === 'and') return pyTruthy(l) ? this.expr(n.right as Node, scope) : l;
    if (op === 'or') return pyTruthy(l) ? l : this.expr(n.right as Node, scope);
    const r = this.expr(n.right as Node, scope);
    switch (op) {
      case '==': return pyEq(l, r);
      case '!=': return !pyEq(l, r);
      case 'in': return pyContains(r, l);
      case 'not in': return !pyContains(r, l);
      case '~': return pyStr(l) + pyStr(r);
    }
    for (const v of [l, r]) if (v instanceof Undefined) throw new TemplateError(`${v.hint} is undefined`);
    switch (op) {
      case '<': return pyCompare(l, r) < 0;
      case '>': return pyCompare(l, r) > 0;
      case '<=': return pyCompare(l, r) <= 0;
      case '>=': return pyCompare(l, r) >= 0;
    }
    if (isNum(l) && isNum(r)) {
      const a = numVal(l), b = numVal(r);
      const float = l instanceof PyFloat || r instanceof PyFloat;
      const wrap = (x: number): unknown => (float ? new PyFloat(x) : x);
      switch (op) {
        case '+': return wrap(a + b);
        case '-': return wrap(a - b);
        case '*': return wrap(a * b);
        case '/':
          if (b === 0) throw new TemplateError('division by zero');
          return new PyFloat(a / b);
        case '//':
          if (b === 0) throw new TemplateError('integer division or modulo by zero');
          return wrap(Math.floor(a / b));
        case '%':
          if (b === 0) throw new TemplateError('integer division or modulo by zero');
          return wrap(a - b * Math.floor(a / b));
        case '**': return wrap(a ** b);
      }
    }
    if (op === '+' && typeof l === 'string' && typeof r === 'string') return l + r;
    if (op === '+' && Array.isArray(l) && Array.isArray(r)) return [...l, ...r];
    if (op === '*' && (typeof l === 'string' || Array.isArray(l)) && isInt(r)) {
      return typeof l === 'string' ? l.repeat(Math.max(0, r)) : Array.from({ length: Math.max(0, r) }, () => l).flat();
    }
    if (op === '+' && (typeof l === 'string' || typeof r === 'string')) {
      throw new TemplateError(`can only concatenate str (not "${typeName(typeof l === 'string' ? r : l)}") to str`);
    }
    throw new TemplateError(`unsupported operand type(s) for ${op}: '${typeName(l)}' and '${typeName(r)}'`);
  }
}

/** A short source-like name for an attribute/item expression, for "is undefined" messages. */
function describe(n: Node): string {
  const part = (x: Node): string => {
    if (x.type === 'Identifier') return x.value as string;
    if (x.type === 'MemberExpression') {
      const p = x.property as Node;
      return `${part(x.object as Node)}${x.computed ? `[${p.type === 'StringLiteral' ? JSON.stringify(p.value) : p.type === 'IntegerLiteral' ? p.value : '…'}]` : `.${p.value}`}`;
    }
    return '…';
  };
  return part(n);
}
