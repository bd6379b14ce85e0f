// An export folder on ONNX Runtime, driven by its manifest (the C# mirror of rwkv_deploy/runtime/session.py):
// feed a token, copy each state output to its input, repeat. Batch 1: this client runs one sequence at a time.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Security.Cryptography;

namespace RwkvDeploy
{
    /// <summary>The recurrent state of one sequence: one runtime tensor per manifest state entry, in its order.
    /// The runtime owns the memory; dispose the State when done (Step/Forward return a new one and leave the
    /// old one intact, so a State can be kept, e.g. to branch after a prompt).</summary>
    public sealed class State : IDisposable
    {
        internal IOrtValue[] Values;
        internal State(IOrtValue[] values) { Values = values; }

        public void Dispose()
        {
            if (Values == null) return;
            foreach (var v in Values) v.Dispose();
            Values = null;
        }
    }

    /// <summary>How to open an export folder.</summary>
    public sealed class SessionOptions
    {
        public int Threads;            // 0: ONNX Runtime's default
        public bool TrustCustomOps;    // allow loading the folder's custom-op library (runs its native code)
    }

    public sealed class RwkvSession : IDisposable
    {
        public readonly Manifest Manifest;
        public readonly IOrtBackend Backend;
        readonly IOrtModel step, prefill;
        readonly string[] stateInputs, stateOutputs;

        public int VocabSize { get { return Manifest.VocabSize; } }
        public bool HasPrefill { get { return prefill != null; } }

        public RwkvSession(Manifest manifest, IOrtBackend backend, SessionOptions options = null)
        {
            Manifest = manifest;
            Backend = backend;
            options = options ?? new SessionOptions();
            stateInputs = manifest.State.Select(s => s.Input).ToArray();
            stateOutputs = manifest.State.Select(s => s.Output).ToArray();
            var modelOptions = new ModelOptions { Threads = options.Threads, CustomOpsLibrary = CustomOpsLibrary(options) };
            step = Open(manifest.Step, modelOptions);
            try
            {
                if (manifest.Prefill != null) prefill = Open(manifest.Prefill, modelOptions);
            }
            catch
            {
                step.Dispose();
                throw;
            }
        }

        /// <summary>The custom-op library of a fused export, once every check on its bytes has passed; null for a
        /// portable export. Loading a library runs its native code, so an export folder must not run any just by
        /// being opened: only with TrustCustomOps, and only the exact file the manifest pins by sha256.</summary>
        string CustomOpsLibrary(SessionOptions options)
        {
            var ops = Manifest.CustomOps;
            if (ops == null) return null;
            string how = "re-export with --wkv portable, or rebuild it with `rwkv-deploy build-ops` and re-export";
            string path;
            if (!ops.LibraryPath.TryGetValue("CPUExecutionProvider", out path))
                throw new RwkvError($"{Manifest.Folder} needs custom operators ({ops.Domain}: {string.Join(", ", ops.Ops)}) " +
                                    $"but names no library for the CPUExecutionProvider; {how}");
            if (!File.Exists(path))
                throw new RwkvError($"this export needs the custom-op library {path}, which is missing; {how}");
            string digest = Sha256Hex(path);
            string want = ops.LibrarySha256["CPUExecutionProvider"];
            if (digest != want)
                throw new RwkvError($"{path} has sha256 {digest.Substring(0, 16)}…, manifest.json requires {want.Substring(0, 16)}…: " +
                                    $"it is not the library this folder was exported with, so it was not loaded; {how}");
            if (!options.TrustCustomOps)
                throw new RwkvError($"{Manifest.Folder} is a fused export: it needs the custom-op library {path} " +
                                    $"(sha256 {digest.Substring(0, 16)}…), and loading it would run its native code. If you " +
                                    $"trust where this export folder came from, pass --trust-custom-ops; otherwise {how}");
            return path;
        }

        public static string Sha256Hex(string path)
        {
            using (var sha = SHA256.Create())
            using (var f = File.OpenRead(path))
                return string.Concat(sha.ComputeHash(f).Select(b => b.ToString("x2")));
        }

        IOrtModel Open(GraphInfo graph, ModelOptions options)
        {
            if (!File.Exists(graph.File))
                throw new RwkvError($"{graph.File} is missing; the export folder is incomplete, re-export it");
            if (graph.ExternalData != null && !File.Exists(graph.ExternalData))
                throw new RwkvError($"{graph.ExternalData} (the weights of {Path.GetFileName(graph.File)}) is missing; the " +
                                    "export folder is incomplete, re-export it");
            IOrtModel model;
            try
            {
                model = Backend.Load(graph.File, options);
            }
            catch (Exception e) when (!(e is RwkvError))
            {
                throw new RwkvError($"ONNX Runtime could not load {graph.File}: {FirstLine(e.Message)}");
            }
            try
            {
                CheckIo(model, graph);
            }
            catch
            {
                model.Dispose();
                throw;
            }
            return model;
        }

        public static string FirstLine(string s)
        {
            s = (s ?? "").Split('\n')[0];
            return s.Length > 300 ? s.Substring(0, 300) : s;
        }

        /// <summary>The manifest and the graph must agree on names, dtypes and state shapes, or every client would
        /// misbehave: checked when the folder is opened, before anything runs or prints.</summary>
        void CheckIo(IOrtModel model, GraphInfo graph)
        {
            var wantIn = new Dictionary<string, string> { { graph.Tokens, "int64" } };
            var wantOut = new Dictionary<string, string> { { graph.Logits, "float32" } };
            foreach (var s in Manifest.State)
            {
                wantIn[s.Input] = ElemTypes.Name(s.DType);
                wantOut[s.Output] = ElemTypes.Name(s.DType);
            }
            CompareIo("input", wantIn, model.Inputs, graph);
            CompareIo("output", wantOut, model.Outputs, graph);
            var specs = model.Inputs.Concat(model.Outputs).ToDictionary(s => s.Name);
            foreach (var s in Manifest.State)
                foreach (var name in new[] { s.Input, s.Output })
                {
                    var dims = specs[name].Dims;
                    if (dims == null) continue;  // unknown rank (state tensors are never scalars)
                    bool same = dims.Length == s.Dims.Length + 1;
                    for (int i = 1; same && i < dims.Length; i++) same = dims[i] < 0 || dims[i] == s.Dims[i - 1];
                    if (!same)
                        throw new RwkvError($"{graph.File} does not match manifest.json: state {name} is {Show(dims, true)} in " +
                                            $"the graph, {Show(s.Dims, false)} in the manifest; re-export the model");
                }
        }

        static void CompareIo(string kind, Dictionary<string, string> want, IList<IoSpec> got, GraphInfo graph)
        {
            var have = got.ToDictionary(s => s.Name, s => ElemTypes.NameOf(s.OnnxType));
            var diff = want.Where(p => { string t; return !have.TryGetValue(p.Key, out t) || t != p.Value; })
                .Select(p => $"('{p.Key}', '{p.Value}')")
                .Concat(have.Where(p => { string t; return !want.TryGetValue(p.Key, out t) || t != p.Value; })
                    .Select(p => $"('{p.Key}', '{p.Value}')"))
                .OrderBy(s => s, StringComparer.Ordinal).Take(3).ToList();
            if (diff.Count > 0)
                throw new RwkvError($"{graph.File} does not match manifest.json: {kind}s differ ([{string.Join(", ", diff)}]); " +
                                    "re-export the model");
        }

        static string Show(long[] dims, bool graph)
        {
            var parts = dims.Select(d => d < 0 ? "?" : d.ToString()).ToList();
            if (!graph) parts.Insert(0, "batch");
            return "[" + string.Join(", ", parts) + "]";
        }

        /// <summary>The initial state (batch 1): each entry's init value, or its init_file (raw little-endian values
        /// of one batch row; state-tuned models).</summary>
        public State InitialState()
        {
            var values = new List<IOrtValue>();
            try
            {
                foreach (var s in Manifest.State) values.Add(InitialTensor(s));
            }
            catch
            {
                foreach (var v in values) v.Dispose();
                throw;
            }
            return new State(values.ToArray());
        }

        IOrtValue InitialTensor(StateEntry s)
        {
            long count = 1;
            foreach (var d in s.Dims) count *= d;
            if (count > int.MaxValue) throw new RwkvError($"state {s.Input} is too large ({count} values)");
            var shape = new long[s.Dims.Length + 1];
            shape[0] = 1;
            Array.Copy(s.Dims, 0, shape, 1, s.Dims.Length);
            byte[] raw = null;
            if (s.InitFile != null)
            {
                try
                {
                    raw = File.ReadAllBytes(s.InitFile);
                }
                catch (Exception e) when (e is IOException || e is UnauthorizedAccessException)
                {
                    throw new RwkvError($"cannot read the initial state {s.InitFile} ({e.Message}); re-export the model");
                }
                int size = ElemTypes.Size(s.DType);
                if (raw.Length != count * size)
                    throw new RwkvError($"{s.InitFile} holds {raw.Length / (double)size:0.##} {ElemTypes.Name(s.DType)} values, " +
                                        $"state {s.Input} needs {count} ({Show(s.Dims, false)}); re-export the model");
                if (!BitConverter.IsLittleEndian) throw new RwkvError("big-endian machines are not supported");
            }
            if (s.DType == ElemType.Float16)
            {
                var bits = new ushort[count];
                if (raw != null) Buffer.BlockCopy(raw, 0, bits, 0, raw.Length);
                else
                {
                    ushort h = Half.FromFloat((float)s.Init);
                    for (long i = 0; i < count; i++) bits[i] = h;
                }
                return Backend.FromFloat16(bits, shape);
            }
            var data = new float[count];
            if (raw != null) Buffer.BlockCopy(raw, 0, data, 0, raw.Length);
            else
            {
                float f = (float)s.Init;
                for (long i = 0; i < count; i++) data[i] = f;
            }
            return Backend.FromFloat32(data, shape);
        }

        void CheckTokens(long[] tokens)
        {
            if (tokens.Length == 0) throw new RwkvError("a sequence needs at least one token");
            foreach (var t in tokens)
                if (t < 0 || t >= VocabSize) throw new RwkvError($"token id {t} is out of range [0, {VocabSize})");
        }

        /// <summary>One token through the step graph: the logits after it [vocab] and the new state
        /// (`state` is left intact).</summary>
        public float[] Step(long token, State state, out State next)
        {
            CheckTokens(new[] { token });
            return Run(step, Manifest.Step, new[] { token }, new long[] { 1 }, state, out next);
        }

        /// <summary>A whole sequence: through the prefill graph in one call when the export has one, else one step
        /// per token. Returns the logits after the last token [vocab] and the state after it.</summary>
        public float[] Forward(long[] tokens, State state, out State next)
        {
            CheckTokens(tokens);
            if (prefill != null)
                return Run(prefill, Manifest.Prefill, tokens, new long[] { 1, tokens.Length }, state, out next);
            float[] logits = null;
            State current = state;
            next = null;
            foreach (var t in tokens)
            {
                logits = Run(step, Manifest.Step, new[] { t }, new long[] { 1 }, current, out next);
                if (!ReferenceEquals(current, state)) current.Dispose();
                current = next;
            }
            return logits;
        }

        float[] Run(IOrtModel model, GraphInfo graph, long[] tokens, long[] tokenShape, State state, out State next)
        {
            if (state == null || state.Values == null) throw new ArgumentException("the state was disposed");
            var names = new string[stateInputs.Length + 1];
            var inputs = new IOrtValue[stateInputs.Length + 1];
            names[0] = graph.Tokens;
            Array.Copy(stateInputs, 0, names, 1, stateInputs.Length);
            Array.Copy(state.Values, 0, inputs, 1, stateInputs.Length);
            var outputNames = new string[stateOutputs.Length + 1];
            outputNames[0] = graph.Logits;
            Array.Copy(stateOutputs, 0, outputNames, 1, stateOutputs.Length);
            IOrtValue[] outputs;
            using (var tokenValue = Backend.FromInt64(tokens, tokenShape))
            {
                inputs[0] = tokenValue;
                try
                {
                    outputs = model.Run(names, inputs, outputNames);
                }
                catch (Exception e) when (!(e is RwkvError))
                {
                    throw new RwkvError($"ONNX Runtime failed running {Path.GetFileName(graph.File)}: {FirstLine(e.Message)}");
                }
            }
            try
            {
                long[] shape;
                float[] logits = Backend.ReadFloat32(outputs[0], out shape);
                int v = VocabSize;
                if (shape.Length < 2 || shape[0] != 1 || shape[shape.Length - 1] != v || logits.Length % v != 0)
                    throw new RwkvError($"{graph.File} returned logits of shape [{string.Join(", ", shape)}], expected " +
                                        $"[1, {v}]; re-export the model");
                if (logits.Length != v)  // prefill with positions "all": [1, T, V] -> the last position
                {
                    var last = new float[v];
                    Array.Copy(logits, logits.Length - v, last, 0, v);
                    logits = last;
                }
                outputs[0].Dispose();
                next = new State(outputs.Skip(1).ToArray());
                return logits;
            }
            catch
            {
                foreach (var o in outputs) o.Dispose();
                throw;
            }
        }

        public void Dispose()
        {
            step.Dispose();
            if (prefill != null) prefill.Dispose();
        }
    }
}
