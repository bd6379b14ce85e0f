// rwkv-deploy C# client: the one exception type that means "bad input" (exit code 2 in the CLI).
using System;

namespace RwkvDeploy
{
    /// <summary>Bad input or a refusal that the user can act on: the CLI prints its message as one
    /// <c>error: …</c> line and exits with code 2. Anything else is a bug.</summary>
    public class RwkvError : Exception
    {
        public RwkvError(string message) : base(message) { }
        public RwkvError(string message, Exception inner) : base(message, inner) { }
    }
}
