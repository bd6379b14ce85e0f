// manifest.json: the contract of an export folder (format rwkv-deploy/2), read and checked the way the Python
// runtime (rwkv_deploy/runtime/manifest.py) reads it: the keys this client uses are type-checked (the subset of
// manifest-2.schema.json that readers rely on), and every file the manifest names must be a relative path that
// stays inside the folder. Shared by Node and the browser: the folder object (folder-node.mjs, folder-url.mjs)
// does the reading.
import { RwkvError } from './errors.mjs';

export const FORMAT = 'rwkv-deploy/2';
export const MANIFEST = 'manifest.json';

// ---- path confinement ---------------------------------------------------------------------------------------

/**
 * The path segments of `rel` (a path named by manifest.json under `key`), normalised, or an RwkvError when it is
 * not a relative path staying inside the folder. Lexical (symlinks are the Node folder's business):
 * absolute paths, drive letters, URL schemes and `..` that climbs out are refused; a backslash counts as a
 * separator (browsers read it as one in URLs).
 */
export function confinedSegments(rel, key, where) {
  if (typeof rel !== 'string' || rel === '') {
    throw new RwkvError(`${where} ${key} must be a non-empty relative path, got ${JSON.stringify(rel)}`);
  }
  if (/^[/\\]/.test(rel) || /^[A-Za-z][A-Za-z0-9+.-]*:/.test(rel)) {
    throw new RwkvError(`${where} ${key} is the absolute path ${JSON.stringify(rel)}; paths in an export folder must ` +
      'be relative to it and stay inside it');
  }
  if (rel.includes('\0')) throw new RwkvError(`${where} ${key} contains a NUL character; refused`);
  const out = [];
  for (const part of rel.split(/[/\\]/)) {
    if (part === '' || part === '.') continue;
    if (part === '..') {
      if (!out.length) {
        throw new RwkvError(`${where} ${key} = ${JSON.stringify(rel)} leads outside the export folder; refused`);
      }
      out.pop();
    } else out.push(part);
  }
  if (!out.length) throw new RwkvError(`${where} ${key} = ${JSON.stringify(rel)} names the folder itself, not a file`);
  return out;
}

// ---- schema (the keys readers use) ----------------------------------------------------------------------------

const typeName = (v) => (v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v);

class Checker {
  constructor(where) {
    this.where = where;
  }

  fail(at, message) {
    throw new RwkvError(`${this.where} does not follow the ${FORMAT} schema: at ${at}, ${message}; re-export the ` +
      'model (or fix the file)');
  }

  object(v, at, required = []) {
    if (typeName(v) !== 'object') this.fail(at, `${JSON.stringify(v)} is not of type 'object'`);
    for (const k of required) if (!(k in v)) this.fail(at, `'${k}' is a required property`);
    return v;
  }

  array(v, at, minItems = 0) {
    if (!Array.isArray(v)) this.fail(at, `${JSON.stringify(v)} is not of type 'array'`);
    if (v.length < minItems) this.fail(at, `${JSON.stringify(v)} should have at least ${minItems} item(s)`);
    return v;
  }

  string(v, at, minLength = 0) {
    if (typeof v !== 'string') this.fail(at, `${JSON.stringify(v)} is not of type 'string'`);
    if (v.length < minLength) this.fail(at, `${JSON.stringify(v)} should be non-empty`);
    return v;
  }

  nullableString(v, at) {
    return v === null || v === undefined ? null : this.string(v, at, 1);
  }

  integer(v, at, minimum) {
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) this.fail(at, `${JSON.stringify(v)} is not of type 'integer'`);
    if (v < minimum) this.fail(at, `${v} is less than the minimum of ${minimum}`);
    return v;
  }

  number(v, at) {
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(at, `${JSON.stringify(v)} is not of type 'number'`);
    return v;
  }

  oneOf(v, at, values) {
    if (!values.includes(v)) this.fail(at, `${JSON.stringify(v)} is not one of ${JSON.stringify(values)}`);
    return v;
  }
}

function checkGraph(c, g, at) {
  c.object(g, at, ['file', 'tokens', 'logits']);
  c.string(g.file, `${at}.file`, 1);
  c.string(g.tokens, `${at}.tokens`, 1);
  c.string(g.logits, `${at}.logits`, 1);
  c.nullableString(g.external_data, `${at}.external_data`);
}

/** Type-check the keys this client uses (a strict subset of manifest-2.schema.json); extra keys are allowed. */
export function checkSchema(m, where) {
  const c = new Checker(where);
  c.object(m, '$', ['format', 'rwkv_version', 'n_layer', 'n_embd', 'vocab_size', 'precision', 'weights_dtype',
    'compute_dtype', 'quantization', 'wkv', 'graphs', 'state', 'tokenizer', 'requires', 'golden', 'engines', 'source']);
  c.string(m.rwkv_version, '$.rwkv_version', 1);
  for (const k of ['n_layer', 'n_embd', 'vocab_size']) c.integer(m[k], `$.${k}`, 1);
  c.string(m.precision, '$.precision', 1);
  c.oneOf(m.weights_dtype, '$.weights_dtype', ['float32', 'float16', 'int8', 'int4']);
  c.oneOf(m.compute_dtype, '$.compute_dtype', ['float32', 'float16']);
  c.oneOf(m.wkv, '$.wkv', ['portable', 'fused']);
  c.object(m.graphs, '$.graphs', ['step']);
  for (const [name, g] of Object.entries(m.graphs)) checkGraph(c, g, `$.graphs.${name}`);
  if (m.graphs.prefill && m.graphs.prefill.positions !== undefined) {
    c.oneOf(m.graphs.prefill.positions, '$.graphs.prefill.positions', ['last', 'all']);
  }
  c.array(m.state, '$.state', 1).forEach((s, i) => {
    const at = `$.state[${i}]`;
    c.object(s, at, ['input', 'output', 'shape', 'dtype', 'init']);
    c.string(s.input, `${at}.input`, 1);
    c.string(s.output, `${at}.output`, 1);
    c.array(s.shape, `${at}.shape`, 2);
    if (s.shape[0] !== 'batch') c.fail(`${at}.shape[0]`, `'batch' was expected`);
    s.shape.slice(1).forEach((d, j) => c.integer(d, `${at}.shape[${j + 1}]`, 1));
    c.oneOf(s.dtype, `${at}.dtype`, ['float32', 'float16']);
    c.number(s.init, `${at}.init`);
    c.nullableString(s.init_file, `${at}.init_file`);
  });
  if (m.tokenizer !== null) {
    const t = c.object(m.tokenizer, '$.tokenizer', ['kind', 'file', 'eos_token_id', 'stop']);
    c.oneOf(t.kind, '$.tokenizer.kind', ['rwkv-world', 'hf-tokenizers']);
    c.string(t.file, '$.tokenizer.file', 1);
    c.integer(t.eos_token_id, '$.tokenizer.eos_token_id', 0);
    c.object(t.stop, '$.tokenizer.stop', ['token_ids']);
    c.array(t.stop.token_ids, '$.tokenizer.stop.token_ids', 1).forEach((id, i) =>
      c.integer(id, `$.tokenizer.stop.token_ids[${i}]`, 0));
  }
  c.object(m.requires, '$.requires', ['custom_ops']);
  if (m.requires.custom_ops !== null) {
    const ops = c.object(m.requires.custom_ops, '$.requires.custom_ops', ['domain', 'ops', 'libraries']);
    c.string(ops.domain, '$.requires.custom_ops.domain', 1);
    c.array(ops.ops, '$.requires.custom_ops.ops', 1).forEach((o, i) => c.string(o, `$.requires.custom_ops.ops[${i}]`, 1));
    c.object(ops.libraries, '$.requires.custom_ops.libraries');
    for (const [ep, lib] of Object.entries(ops.libraries)) {
      c.object(lib, `$.requires.custom_ops.libraries.${ep}`, ['path', 'sha256']);
      c.string(lib.path, `$.requires.custom_ops.libraries.${ep}.path`, 1);
    }
  }
  const g = c.object(m.golden, '$.golden', ['tokens', 'logits_file', 'shape', 'dtype', 'tolerance']);
  c.array(g.tokens, '$.golden.tokens', 1).forEach((t, i) => c.integer(t, `$.golden.tokens[${i}]`, 0));
  c.string(g.logits_file, '$.golden.logits_file', 1);
  c.array(g.shape, '$.golden.shape', 2);
  if (g.shape.length > 2) c.fail('$.golden.shape', `${JSON.stringify(g.shape)} is too long`);
  g.shape.forEach((d, i) => c.integer(d, `$.golden.shape[${i}]`, 1));
  if (g.dtype !== 'float32') c.fail('$.golden.dtype', `'float32' was expected`);
  const tol = c.object(g.tolerance, '$.golden.tolerance', ['normalised', 'top1']);
  if (c.number(tol.normalised, '$.golden.tolerance.normalised') <= 0) {
    c.fail('$.golden.tolerance.normalised', `${tol.normalised} is less than or equal to the minimum of 0`);
  }
  const top1 = c.number(tol.top1, '$.golden.tolerance.top1');
  if (top1 < 0 || top1 > 1) c.fail('$.golden.tolerance.top1', `${top1} is not within [0, 1]`);
  c.array(m.engines, '$.engines').forEach((e, i) => {
    c.object(e, `$.engines[${i}]`, ['file', 'graph']);
    c.string(e.file, `$.engines[${i}].file`, 1);
  });
  c.object(m.source, '$.source', ['path', 'sha256']);
}

/** (key, relative path) of every file the manifest names, as rwkv_deploy's Manifest.named_paths lists them. */
export function namedPaths(m) {
  const named = [];
  for (const [name, g] of Object.entries(m.graphs)) {
    for (const k of ['file', 'external_data']) if (g[k] !== null && g[k] !== undefined) named.push([`graphs.${name}.${k}`, g[k]]);
  }
  m.state.forEach((s, i) => {
    if (s.init_file !== null && s.init_file !== undefined) named.push([`state[${i}].init_file`, s.init_file]);
  });
  if (m.tokenizer) named.push(['tokenizer.file', m.tokenizer.file]);
  if (m.golden) named.push(['golden.logits_file', m.golden.logits_file]);
  for (const [ep, lib] of Object.entries((m.requires.custom_ops || {}).libraries || {})) {
    named.push([`requires.custom_ops.libraries.${ep}.path`, lib.path]);
  }
  m.engines.forEach((e, i) => named.push([`engines[${i}].file`, e.file]));
  return named;
}

/**
 * Parse and check an export folder's manifest.json through `folder` (folder-node.mjs or folder-url.mjs):
 * format, types of the keys used, every named path confined to the folder (symlinks included in Node), and no
 * custom operators (onnxruntime-node and onnxruntime-web cannot register them). Every problem is an RwkvError.
 */
export async function readManifest(folder) {
  const where = folder.describe(MANIFEST);
  const text = await folder.readManifestText();
  let m;
  try {
    m = JSON.parse(text);
  } catch (e) {
    throw new RwkvError(`${where} is not valid JSON (${String(e.message).slice(0, 200)})`);
  }
  if (typeName(m) !== 'object') {
    throw new RwkvError(`${where} holds a JSON ${typeName(m)}, not an object; re-export the model`);
  }
  if (m.format === 'rwkv-deploy/1') {
    throw new RwkvError(`${where} has format 'rwkv-deploy/1', which this client does not read (it needs ${FORMAT}: golden ` +
      'logits, requires.custom_ops, tokenizer stop ids); re-export the model with a current rwkv-deploy');
  }
  if (m.format !== FORMAT) {
    throw new RwkvError(`${where} has format ${JSON.stringify(m.format ?? null)}; this client reads '${FORMAT}' ` +
      '(a newer format needs a newer client)');
  }
  checkSchema(m, where);
  for (const [key, rel] of namedPaths(m)) await folder.confine(key, rel);
  const ops = m.requires.custom_ops;
  if (ops !== null) {
    throw new RwkvError(`${folder.label} needs the custom operators ${ops.ops.map((o) => `${ops.domain}::${o}`).join(', ')} ` +
      `(an export made with --wkv ${m.wkv}); onnxruntime-node and onnxruntime-web cannot register custom operators: ` +
      're-export it with --wkv portable to run it here');
  }
  return m;
}
