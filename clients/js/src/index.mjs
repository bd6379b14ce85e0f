// The shared library: nothing here imports ONNX Runtime or touches files; node.mjs and browser.mjs add those.
export { RwkvError } from './errors.mjs';
export { FORMAT, readManifest, checkSchema, confinedSegments, namedPaths } from './manifest.mjs';
export { WorldTokenizer, HFTokenizer, loadTokenizer, tokenizerKind, pythonLiteralBytes } from './tokenizer.mjs';
export { TextStream } from './stream.mjs';
export { SplitMix64, makeRng, sample, argmax } from './sampling.mjs';
export { RwkvSession, State, score } from './session.mjs';
export { check, compare, normalised, goldenLogits, CheckResult } from './check.mjs';
export { generate, GenerationStats, checkOptions } from './generate.mjs';
export { toFloat16Bits, fromFloat16Bits } from './float16.mjs';
export { UrlFolder } from './folder-url.mjs';
