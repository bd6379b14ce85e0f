// Streaming generation (rwkv_deploy.runtime.generate.generate): the prompt in one forward call (the prefill graph
// when the folder has one), then one step per token; nucleus sampling over the tokenizer's ids only (models carry
// more logits than the World vocabulary has ids); stops on id 0 or a manifest stop id (not shown); text comes
// out byte-exact through TextStream.
import { RwkvError } from './errors.mjs';
import { makeRng, sample } from './sampling.mjs';
import { TextStream } from './stream.mjs';

export class GenerationStats {
  constructor() {
    this.promptTokens = 0;
    this.promptSeconds = 0;
    this.tokens = 0;
    this.seconds = 0;
  }

  get tokensPerSecond() {
    return this.seconds > 0 ? this.tokens / this.seconds : NaN;
  }

  /** e.g. "24 tokens in 0.51 s: 47.1 tokens/s (prompt 8 tokens in 0.02 s)", as the Python runtime prints. */
  line() {
    const rate = this.seconds > 0 ? this.tokensPerSecond.toFixed(1) : '-';
    return `${this.tokens} tokens in ${this.seconds.toFixed(2)} s: ${rate} tokens/s ` +
      `(prompt ${this.promptTokens} tokens in ${this.promptSeconds.toFixed(2)} s)`;
  }
}

export function checkOptions({ maxTokens = 100, temperature = 1.0, topP = 0.85 } = {}) {
  if (!(Number.isFinite(temperature) && temperature >= 0) || !(topP > 0 && topP <= 1) ||
      !(Number.isSafeInteger(maxTokens) && maxTokens >= 0)) {
    throw new RwkvError(`need a finite temperature >= 0, 0 < top_p <= 1, an integer max_tokens >= 0; got ${temperature}, ${topP}, ${maxTokens}`);
  }
}

/** Yields text pieces as they become valid UTF-8; `stats` (a GenerationStats) is filled in as it runs. */
export async function* generate(session, prompt, { maxTokens = 100, temperature = 1.0, topP = 0.85, seed = null,
  stopAtEos = true, stats = new GenerationStats() } = {}) {
  checkOptions({ maxTokens, temperature, topP });
  const rng = makeRng(seed);
  const tok = await session.tokenizer();
  if (typeof prompt !== 'string' || prompt.isWellFormed && !prompt.isWellFormed()) {
    throw new RwkvError('the prompt is not valid Unicode text (it holds a lone surrogate); pass UTF-8 text');
  }
  const ids = tok.encode(prompt);
  if (!ids.length) throw new RwkvError('the prompt is empty; pass some text with --prompt');
  const stop = session.stopIds();
  const now = () => performance.now() / 1000;
  let t0 = now();
  let { logits, state } = await session.forward([ids], await session.initState(1));
  stats.promptTokens = ids.length;
  stats.promptSeconds = now() - t0;
  t0 = now();
  const stream = new TextStream(tok);
  const n = Math.min(tok.vocabSize, logits[0].length);
  for (let i = 0; i < maxTokens; i++) {
    const next = sample(logits[0].subarray(0, n), rng, temperature, topP);
    if (stopAtEos && stop.has(next)) break;
    stats.tokens = i + 1;
    stats.seconds = now() - t0;
    const piece = stream.push(next);
    if (piece) yield piece;
    if (i + 1 < maxTokens) { // the logits after the last token would never be used
      ({ logits, state } = await session.step([next], state));
    }
  }
  const tail = stream.finish();
  if (tail) yield tail;
}
