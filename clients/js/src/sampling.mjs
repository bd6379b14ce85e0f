// Nucleus sampling, as rwkv_deploy.runtime.generate.sample: temperature 0 is greedy (the first maximum), else
// softmax(logits / temperature) in float64, the smallest set of most probable tokens whose mass reaches top_p
// (ties in probability keep id order), renormalised, one draw.
//
// The random numbers come from SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
// OOPSLA 2014; the generator java.util.SplittableRandom uses): state += 0x9E3779B97F4A7C15, then two xor-shift-
// multiply rounds; a double in [0, 1) is the top 53 bits / 2**53. The same --seed gives the same draws on every
// runtime and machine; they differ from numpy's (the Python runtime uses PCG64), so a seed does not reproduce
// the Python client's text.
import { RwkvError } from './errors.mjs';

const MASK = (1n << 64n) - 1n;

export class SplitMix64 {
  constructor(seed) {
    this.state = BigInt.asUintN(64, BigInt(seed));
  }

  nextU64() {
    this.state = (this.state + 0x9e3779b97f4a7c15n) & MASK;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
    return z ^ (z >> 31n);
  }

  /** A double in [0, 1). */
  random() {
    return Number(this.nextU64() >> 11n) / 2 ** 53;
  }
}

/** A generator for `seed` (an integer in [0, 2**63), as the Python runtime accepts), or a random seed if null. */
export function makeRng(seed) {
  if (seed === null || seed === undefined) {
    const words = new Uint32Array(2);
    globalThis.crypto.getRandomValues(words);
    return new SplitMix64((BigInt(words[0]) << 32n) | BigInt(words[1]));
  }
  let s;
  try {
    s = BigInt(seed);
  } catch {
    s = -1n;
  }
  if (typeof seed === 'number' && !Number.isSafeInteger(seed)) s = -1n;
  if (s < 0n || s >= 1n << 63n) throw new RwkvError(`the seed must be an integer in [0, 2**63); got ${seed}`);
  return new SplitMix64(s);
}

export function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** One token id from a row of logits (a typed array or array, already cut to the tokenizer's ids). */
export function sample(logits, rng, temperature = 1.0, topP = 0.85) {
  if (temperature === 0) return argmax(logits);
  const n = logits.length;
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > max) max = logits[i];
  const p = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    p[i] = Math.exp((logits[i] - max) / temperature);
    sum += p[i];
  }
  for (let i = 0; i < n; i++) p[i] /= sum;
  // The smallest prefix of the ids by descending probability (ties in id order) whose mass reaches top_p, as
  // numpy's searchsorted(cumsum(p[order]), top_p) + 1. Only the head of that order is sorted: the ids with p at
  // least a threshold come first in the full order, so once their mass reaches top_p the prefix lies among them.
  let keep = null;
  for (let threshold = p[argmax(p)] / 16; keep === null; threshold /= 256) {
    if (threshold < 1e-300) threshold = 0;
    const head = [];
    for (let i = 0; i < n; i++) if (p[i] >= threshold) head.push(i);
    head.sort((a, b) => p[b] - p[a] || a - b);
    let cum = 0;
    for (let k = 0; k < head.length; k++) {
      cum += p[head[k]];
      if (cum >= topP) {
        keep = head.slice(0, k + 1);
        break;
      }
    }
    if (keep === null && threshold === 0) keep = head; // rounding left the total mass under top_p: keep all
  }
  let mass = 0;
  for (const i of keep) mass += p[i];
  const u = rng.random() * mass;
  let acc = 0;
  for (const i of keep) {
    acc += p[i];
    if (u < acc) return i;
  }
  return keep[keep.length - 1];
}
