// Every problem with the user's input (folder, manifest, arguments) is an RwkvError: the CLI prints its message
// as one `error: ...` line and exits 2; anything else is a bug and keeps its stack trace.
export class RwkvError extends Error {
  constructor(message) {
    super(message);
    this.name = 'RwkvError';
  }
}
