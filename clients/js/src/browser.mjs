// Browser entry point: an export folder served over HTTP, on onnxruntime-web's wasm backend. The page imports
// ONNX Runtime itself (an import map names where) and passes it in: the library has no bundler-specific imports.
import { RwkvSession } from './session.mjs';
import { UrlFolder } from './folder-url.mjs';

export * from './index.mjs';

/** An RwkvSession on the export folder at `baseUrl` (relative to the page or absolute). */
export async function openExportUrl(ort, baseUrl, { sessionOptions = {} } = {}) {
  return RwkvSession.open({
    ort, folder: new UrlFolder(baseUrl), runtime: 'web',
    sessionOptions: { executionProviders: ['wasm'], logSeverityLevel: 3, ...sessionOptions },
  });
}
