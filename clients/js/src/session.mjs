// An export folder on ONNX Runtime (onnxruntime-node or onnxruntime-web: the `ort` module is passed in), driven by
// the manifest alone, as rwkv_deploy.runtime.session.OnnxSession: feed a token, copy each state output to its
// input, repeat. The prefill graph (a whole prompt in one call) is used by forward() when the folder has one.
import { RwkvError } from './errors.mjs';
import { readManifest } from './manifest.mjs';
import { loadTokenizer } from './tokenizer.mjs';
import { toFloat16Bits } from './float16.mjs';

const ARRAYS = { float32: Float32Array, float16: Uint16Array };

const product = (dims) => dims.reduce((a, b) => a * b, 1);

function sameShape(graphShape, manifestShape) {
  if (!graphShape || !graphShape.length) return true; // unknown rank
  if (graphShape.length !== manifestShape.length) return false;
  return graphShape.slice(1).every((g, i) => typeof g !== 'number' || g === manifestShape[i + 1]);
}

const show = (shape) => `[${shape.map((d) => (typeof d === 'number' ? d : '?')).join(', ')}]`;

/** The recurrent state of `batch` sequences: state input name -> ort.Tensor, in the manifest's order. Sessions
 * never change a State in place: one can be kept and reused. */
export class State {
  constructor(tensors, batch) {
    this.tensors = tensors;
    this.batch = batch;
  }
}

export class RwkvSession {
  /**
   * ort: the onnxruntime-node or onnxruntime-web module; folder: a NodeFolder or UrlFolder; runtime: 'node' |
   * 'web' (how graphs are handed to ONNX Runtime); sessionOptions: extra InferenceSession options.
   */
  static async open({ ort, folder, runtime = 'node', sessionOptions = {} }) {
    const manifest = await readManifest(folder);
    const s = new RwkvSession(ort, folder, manifest, runtime);
    s.step_ = await s.openGraph('step', sessionOptions);
    s.prefill_ = manifest.graphs.prefill ? await s.openGraph('prefill', sessionOptions) : null;
    return s;
  }

  constructor(ort, folder, manifest, runtime) {
    this.ort = ort;
    this.folder = folder;
    this.manifest = manifest;
    this.runtime = runtime;
    this.states = manifest.state;
    this.vocabSize = manifest.vocab_size;
    this.tokenizer_ = null;
    this.initRows = new Map();
  }

  get hasPrefill() {
    return this.prefill_ !== null;
  }

  async openGraph(name, sessionOptions) {
    const g = this.manifest.graphs[name];
    const { model, options } = await this.folder.graphSource(`graphs.${name}.file`, g.file, g.external_data, this.runtime);
    let sess;
    try {
      sess = await this.ort.InferenceSession.create(model, { ...options, ...sessionOptions });
    } catch (e) {
      const first = String(e && e.message ? e.message : e).split('\n')[0].slice(0, 300);
      throw new RwkvError(`ONNX Runtime could not load ${this.folder.describe(g.file)}: ${first}`);
    }
    this.checkIO(sess, g);
    return sess;
  }

  /** The manifest and the graph must agree on names, dtypes and state shapes (OnnxSession._check_io). */
  checkIO(sess, g) {
    const where = this.folder.describe(g.file);
    const meta = (names, list) => new Map(names.map((n, i) => [n, list ? list[i] : null]));
    const ins = meta(sess.inputNames, sess.inputMetadata);
    const outs = meta(sess.outputNames, sess.outputMetadata);
    const wantIn = new Map([[g.tokens, 'int64'], ...this.states.map((s) => [s.input, s.dtype])]);
    const wantOut = new Map([[g.logits, 'float32'], ...this.states.map((s) => [s.output, s.dtype])]);
    for (const [kind, want, got] of [['input', wantIn, ins], ['output', wantOut, outs]]) {
      const missing = [...want.keys()].filter((n) => !got.has(n));
      const extra = [...got.keys()].filter((n) => !want.has(n));
      const badType = [...want].filter(([n, t]) => got.get(n) && got.get(n).type && got.get(n).type !== t);
      if (missing.length || extra.length || badType.length) {
        const diff = [...missing.map((n) => `missing ${n}`), ...extra.map((n) => `unexpected ${n}`),
          ...badType.map(([n, t]) => `${n} is ${got.get(n).type}, not ${t}`)].slice(0, 3);
        throw new RwkvError(`${where} does not match manifest.json: ${kind}s differ (${diff.join('; ')}); re-export the model`);
      }
    }
    for (const s of this.states) {
      for (const [name, m] of [[s.input, ins.get(s.input)], [s.output, outs.get(s.output)]]) {
        if (m && m.shape && !sameShape(m.shape, s.shape)) {
          throw new RwkvError(`${where} does not match manifest.json: state ${name} is ${show(m.shape)} in the graph, ` +
            `${show(s.shape)} in the manifest; re-export the model`);
        }
      }
    }
  }

  /** One batch row of a state's initial value (init fill, or init_file's raw little-endian values). */
  async initialRow(s) {
    if (this.initRows.has(s.input)) return this.initRows.get(s.input);
    const n = product(s.shape.slice(1));
    const Arr = ARRAYS[s.dtype];
    let row;
    if (s.init_file) {
      const bytes = await this.folder.readBytes(`init_file of state ${JSON.stringify(s.input)}`, s.init_file, 'the initial state');
      const width = Arr.BYTES_PER_ELEMENT;
      if (bytes.length !== n * width) {
        throw new RwkvError(`${this.folder.describe(s.init_file)} holds ${bytes.length / width} ${s.dtype} values, state ` +
          `${s.input} needs ${n} (${JSON.stringify(s.shape)}); re-export the model`);
      }
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      row = new Arr(n);
      for (let i = 0; i < n; i++) row[i] = width === 4 ? view.getFloat32(4 * i, true) : view.getUint16(2 * i, true);
    } else {
      row = new Arr(n).fill(s.dtype === 'float16' ? toFloat16Bits(s.init) : s.init);
    }
    this.initRows.set(s.input, row);
    return row;
  }

  async initState(batch = 1) {
    if (!Number.isSafeInteger(batch) || batch < 1) throw new RwkvError(`the batch must be an integer >= 1, got ${batch}`);
    const tensors = new Map();
    for (const s of this.states) {
      const row = await this.initialRow(s);
      const data = new ARRAYS[s.dtype](row.length * batch);
      for (let b = 0; b < batch; b++) data.set(row, b * row.length);
      tensors.set(s.input, new this.ort.Tensor(s.dtype, data, [batch, ...s.shape.slice(1)]));
    }
    return new State(tensors, batch);
  }

  checkTokens(rows) {
    for (const row of rows) {
      for (const t of row) {
        if (!Number.isSafeInteger(t) || t < 0 || t >= this.vocabSize) {
          throw new RwkvError(`token id ${t} is out of range [0, ${this.vocabSize})`);
        }
      }
    }
  }

  async run(graph, rows, state) {
    const g = this.manifest.graphs[graph];
    const sess = graph === 'step' ? this.step_ : this.prefill_;
    if (rows.length !== state.batch) {
      throw new RwkvError(`tokens are a batch of ${rows.length}, the state a batch of ${state.batch}`);
    }
    this.checkTokens(rows);
    const flat = BigInt64Array.from(rows.flat(), (t) => BigInt(t));
    const dims = graph === 'step' ? [rows.length] : [rows.length, rows[0].length];
    const feeds = { [g.tokens]: new this.ort.Tensor('int64', flat, dims) };
    for (const [name, t] of state.tensors) feeds[name] = t;
    let out;
    try {
      out = await sess.run(feeds);
    } catch (e) { // e.g. out of wasm memory, or a graph that fails on these inputs
      const first = String(e && e.message ? e.message : e).split('\n')[0].slice(0, 300);
      throw new RwkvError(`ONNX Runtime failed running ${this.folder.describe(g.file)}: ${first}`);
    }
    const logits = out[g.logits];
    const V = logits.dims[logits.dims.length - 1];
    const steps = logits.dims.length === 3 ? logits.dims[1] : 1; // `--prefill all`: every position's logits
    const data = logits.data;
    const last = [];
    for (let b = 0; b < rows.length; b++) {
      const at = (b * steps + steps - 1) * V;
      last.push(data.slice(at, at + V));
    }
    const next = new Map(this.states.map((s) => [s.input, out[s.output]]));
    return { logits: last, state: new State(next, state.batch) };
  }

  /** tokens: one id per batch row -> { logits: [Float32Array(V)] per row, state }. */
  async step(tokens, state) {
    return this.run('step', tokens.map((t) => [t]), state);
  }

  /** tokens: [batch][seq] in one call of the prefill graph -> the last position's logits per row and the state. */
  async prefill(tokens, state) {
    if (!this.hasPrefill) throw new RwkvError(`${this.folder.label} has no prefill graph; re-export with --prefill`);
    this.checkSeq(tokens);
    return this.run('prefill', tokens, state);
  }

  /** tokens: [batch][seq] -> the last position's logits and the state: prefill when the folder has it, else steps. */
  async forward(tokens, state) {
    this.checkSeq(tokens);
    if (this.hasPrefill) return this.run('prefill', tokens, state);
    let r;
    for (let t = 0; t < tokens[0].length; t++) {
      r = await this.run('step', tokens.map((row) => [row[t]]), state);
      state = r.state;
    }
    return r;
  }

  checkSeq(tokens) {
    if (!tokens.length || !tokens[0].length || tokens.some((r) => r.length !== tokens[0].length)) {
      throw new RwkvError('a sequence needs at least one token, and every batch row the same number');
    }
  }

  /** The tokenizer the folder ships (manifest "tokenizer"). */
  async tokenizer() {
    if (!this.tokenizer_) {
      const t = this.manifest.tokenizer;
      if (!t) throw new RwkvError(`${this.folder.label} has no tokenizer; attach one with \`rwkv-deploy tokenizer OUT FILE\``);
      const text = await this.folder.readText('tokenizer.file', t.file, 'tokenizer file');
      this.tokenizer_ = await loadTokenizer(text, t.kind, this.folder.describe(t.file));
    }
    return this.tokenizer_;
  }

  /** The ids that end generation: 0 (end of text in both RWKV vocabularies) and the manifest's stop ids. */
  stopIds() {
    const t = this.manifest.tokenizer;
    return new Set([0, ...(t ? t.stop.token_ids : [])]);
  }

  async release() {
    for (const s of [this.step_, this.prefill_]) if (s && s.release) await s.release();
  }
}

/** Per token, the logits after it: from the initial state at batch 1, one token per step (the `score` command). */
export async function score(session, tokens) {
  let state = await session.initState(1);
  const rows = [];
  for (const t of tokens) {
    const r = await session.step([t], state);
    rows.push(r.logits[0]);
    state = r.state;
  }
  return rows;
}
