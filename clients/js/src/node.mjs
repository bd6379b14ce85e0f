// Node entry point: an export folder on disk, on onnxruntime-node (native CPU) or onnxruntime-web (wasm, the
// browser's runtime, run in Node).
import { RwkvError } from './errors.mjs';
import { NodeFolder } from './folder-node.mjs';
import { RwkvSession } from './session.mjs';

export * from './index.mjs';
export { NodeFolder } from './folder-node.mjs';

export const RUNTIMES = ['node', 'web'];

/** The ONNX Runtime module for `runtime`: 'node' (onnxruntime-node) or 'web' (onnxruntime-web's wasm backend). */
export async function loadOrt(runtime = 'node', { threads } = {}) {
  if (runtime === 'node') return import('onnxruntime-node');
  if (runtime === 'web') {
    const ort = await import('onnxruntime-web');
    // one thread unless asked: in Node, wasm threads are worker threads that cost more than they give on small models
    ort.env.wasm.numThreads = threads || 1;
    ort.env.logLevel = 'error';
    return ort;
  }
  throw new RwkvError(`unknown runtime ${JSON.stringify(runtime)}; expected one of ${RUNTIMES.join(', ')}`);
}

/** An RwkvSession on the export folder `dir`. */
export async function openExport(dir, { runtime = 'node', threads } = {}) {
  const ort = await loadOrt(runtime, { threads });
  const sessionOptions = { logSeverityLevel: 3 };
  if (runtime === 'node') {
    sessionOptions.executionProviders = ['cpu'];
    if (threads) sessionOptions.intraOpNumThreads = threads;
  } else {
    sessionOptions.executionProviders = ['wasm'];
  }
  return RwkvSession.open({ ort, folder: new NodeFolder(dir), runtime, sessionOptions });
}
