// Every problem with the user's input (folder, manifest, arguments) is an RwkvError: the CLI prints its message
// as one `error: ...` line and exits 2; anything else is a bug and keeps its stack trace.
export class RwkvError extends Error {
  constructor(message) {
    super(message);
    this.name = 'RwkvError';
  }
}

/** The bytes as UTF-8 text, or an RwkvError naming `what` at `where` (both folder readers use it). */
export function utf8Text(bytes, what, where) {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new RwkvError(`${what} ${where} is not UTF-8 text; is it the right file?`);
  }
}
