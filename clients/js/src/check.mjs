// The golden check (rwkv_deploy.runtime.check): replay manifest.golden.tokens one at a time (batch 1, from the
// initial state, the step graph) and hold the logits to golden/logits.bin by the manifest's rule: every row's
// max|Δlogit| / std(golden row) <= tolerance.normalised, and top-1 agreement on >= tolerance.top1 of the rows,
// where golden's logit at our argmax within tolerance.normalised x std of golden's maximum counts as agreement.
import { RwkvError } from './errors.mjs';
import { score } from './session.mjs';
import { argmax } from './sampling.mjs';

/** max|a - b| / std(b) in float64 (population std, as numpy). */
export function normalised(ours, ref) {
  let mean = 0;
  for (let i = 0; i < ref.length; i++) mean += ref[i];
  mean /= ref.length;
  let v = 0;
  let d = 0;
  for (let i = 0; i < ref.length; i++) {
    v += (ref[i] - mean) ** 2;
    const x = Math.abs(ours[i] - ref[i]);
    if (!(x <= d)) d = x; // NaN wins
  }
  return d / Math.sqrt(v / ref.length);
}

/** The golden tokens and logits rows of a session's folder; a folder without them is bad input. */
export async function goldenLogits(session) {
  const m = session.manifest;
  const g = m.golden;
  const [T, V] = g.shape;
  if (T !== g.tokens.length || V !== m.vocab_size) {
    throw new RwkvError(`${session.folder.describe('manifest.json')} golden.shape ${JSON.stringify(g.shape)} does not match ` +
      `${g.tokens.length} tokens x vocab_size ${m.vocab_size}; re-export it`);
  }
  const bytes = await session.folder.readBytes('golden.logits_file', g.logits_file, 'the golden logits');
  if (bytes.length !== T * V * 4) {
    throw new RwkvError(`${session.folder.describe(g.logits_file)} holds ${bytes.length / 4} float32 values, golden.shape ` +
      `${JSON.stringify(g.shape)} needs ${T * V}; re-export the model`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const rows = [];
  for (let t = 0; t < T; t++) {
    const row = new Float64Array(V);
    for (let v = 0; v < V; v++) row[v] = view.getFloat32(4 * (t * V + v), true);
    rows.push(row);
  }
  return { tokens: g.tokens, rows };
}

export function compare(ours, golden, tokens, tolerance) {
  const distance = [];
  const top1 = [];
  golden.forEach((ref, t) => {
    distance.push(normalised(ours[t], ref));
    let mean = 0;
    for (const x of ref) mean += x;
    mean /= ref.length;
    let v = 0;
    for (const x of ref) v += (x - mean) ** 2;
    const std = Math.sqrt(v / ref.length);
    const pick = argmax(ours[t]);
    top1.push(ref[argmax(ref)] - ref[pick] <= tolerance.normalised * std);
  });
  return new CheckResult(tokens, distance, top1, tolerance);
}

export class CheckResult {
  constructor(tokens, distance, top1, tolerance) {
    Object.assign(this, { tokens, distance, top1, tolerance });
  }

  failures() {
    const out = [];
    let worst = 0;
    this.distance.forEach((d, i) => {
      if (!(d <= this.distance[worst])) worst = i;
    });
    const d = this.distance[worst];
    if (!(d <= this.tolerance.normalised)) { // `!(<=)`: a NaN fails
      out.push(`logits of row ${worst} are ${fmt(d)} (max|Δ|/std) from the golden logits, more than the tolerance ${fmtG(this.tolerance.normalised)}`);
    }
    const agree = this.top1.filter(Boolean).length / this.top1.length;
    if (agree < this.tolerance.top1) {
      out.push(`top-1 agrees on ${Math.round(100 * agree)}% of rows, less than ${Math.round(100 * this.tolerance.top1)}%`);
    }
    return out;
  }

  get passed() {
    return this.failures().length === 0;
  }

  table() {
    const lines = [`${'row'.padStart(4)} ${'token'.padStart(7)} ${'max|Δ|/std'.padStart(11)}  top-1`];
    this.tokens.forEach((tok, t) => {
      lines.push(`${String(t).padStart(4)} ${String(tok).padStart(7)} ${fmt(this.distance[t]).padStart(11)}  ${this.top1[t] ? 'ok' : 'DIFFERS'}`);
    });
    lines.push(`tolerance: max|Δ|/std <= ${fmtG(this.tolerance.normalised)}, top-1 >= ${Math.round(100 * this.tolerance.top1)}% (near-ties count)`);
    lines.push(this.passed ? 'PASS' : `FAIL: ${this.failures().join('; ')}`);
    return lines.join('\n');
  }
}

/** Python's format(x, '.{p}g'): e.g. 9.08e-07, 0.00167, 0.0001, 1e-05. */
export function fmtG(x, p = 6) {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (x === 0) return '0';
  const [mant, expText] = x.toExponential(p - 1).split('e');
  const exp = Number(expText);
  const strip = (s) => (s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s);
  if (exp < -4 || exp >= p) return `${strip(mant)}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  return strip(x.toFixed(Math.max(0, p - 1 - exp)));
}

const fmt = (x) => fmtG(x, 3);

/** Replay the golden tokens through `session` and compare. */
export async function check(session) {
  const { tokens, rows } = await goldenLogits(session); // first: a bad golden file fails before anything runs
  const ours = await score(session, tokens);
  return compare(ours, rows, tokens, session.manifest.golden.tolerance);
}
