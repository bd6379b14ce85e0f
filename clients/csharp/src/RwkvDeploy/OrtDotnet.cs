// The official Microsoft.ML.OnnxRuntime package behind IOrtBackend, for .NET users: compiled only when RWKV_MSORT
// is defined, which RwkvDeploy.csproj does (with a PackageReference to Microsoft.ML.OnnxRuntime) for `dotnet build`.
// build.sh (mono's mcs) leaves this file out: mono has no NuGet here, so this binding has NOT been compiled or run
// in this repository's tests; the C API binding (OrtCApi.cs), which shares every other file, is what is tested.
#if RWKV_MSORT
using System;
using System.Collections.Generic;
using System.Linq;
using System.Runtime.InteropServices;
using Microsoft.ML.OnnxRuntime;

namespace RwkvDeploy
{
    public sealed class MsOrtBackend : IOrtBackend
    {
        public string Description
        {
            get { return "onnxruntime (Microsoft.ML.OnnxRuntime " + typeof(InferenceSession).Assembly.GetName().Version + ")"; }
        }

        public IOrtModel Load(string modelPath, ModelOptions options)
        {
            var so = new Microsoft.ML.OnnxRuntime.SessionOptions { LogSeverityLevel = OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR };
            try
            {
                if (options != null && options.Threads > 0) so.IntraOpNumThreads = options.Threads;
                if (options != null && options.CustomOpsLibrary != null) so.RegisterCustomOpLibrary(options.CustomOpsLibrary);
                return new Model(new InferenceSession(modelPath, so), so);
            }
            catch
            {
                so.Dispose();
                throw;
            }
        }

        sealed class Value : IOrtValue
        {
            public OrtValue V;
            public Value(OrtValue v) { V = v; }
            public void Dispose()
            {
                if (V != null) V.Dispose();
                V = null;
            }
        }

        sealed class Model : IOrtModel
        {
            readonly InferenceSession session;
            readonly Microsoft.ML.OnnxRuntime.SessionOptions options;
            readonly List<IoSpec> inputs, outputs;

            public Model(InferenceSession session, Microsoft.ML.OnnxRuntime.SessionOptions options)
            {
                this.session = session;
                this.options = options;
                inputs = Describe(session.InputMetadata);
                outputs = Describe(session.OutputMetadata);
            }

            static List<IoSpec> Describe(IReadOnlyDictionary<string, NodeMetadata> metadata)
            {
                var specs = new List<IoSpec>();
                foreach (var p in metadata)
                {
                    var spec = new IoSpec { Name = p.Key };
                    if (p.Value.OnnxValueType == OnnxValueType.ONNX_TYPE_TENSOR)
                    {
                        spec.OnnxType = (int)p.Value.ElementDataType;
                        var dims = p.Value.Dimensions;
                        spec.Dims = dims == null || dims.Length == 0 ? null : dims.Select(d => (long)d).ToArray();
                    }
                    specs.Add(spec);
                }
                return specs;
            }

            public IList<IoSpec> Inputs { get { return inputs; } }
            public IList<IoSpec> Outputs { get { return outputs; } }

            public IOrtValue[] Run(string[] inputNames, IOrtValue[] inputValues, string[] outputNames)
            {
                using (var runOptions = new RunOptions())
                {
                    // the collection owns the outputs; ownership passes to the Value wrappers, so it is not disposed
                    var results = session.Run(runOptions, inputNames, inputValues.Select(v => ((Value)v).V).ToArray(),
                                              outputNames);
                    return results.Select(v => (IOrtValue)new Value(v)).ToArray();
                }
            }

            public void Dispose()
            {
                session.Dispose();
                options.Dispose();
            }
        }

        static IOrtValue Tensor<T>(T[] data, long[] shape, TensorElementType type) where T : unmanaged
        {
            var value = OrtValue.CreateAllocatedTensorValue(OrtAllocator.DefaultInstance, type, shape);
            MemoryMarshal.AsBytes(data.AsSpan()).CopyTo(value.GetTensorMutableRawData());
            return new Value(value);
        }

        public IOrtValue FromFloat32(float[] data, long[] shape) { return Tensor(data, shape, TensorElementType.Float); }
        public IOrtValue FromFloat16(ushort[] bits, long[] shape) { return Tensor(bits, shape, TensorElementType.Float16); }
        public IOrtValue FromInt64(long[] data, long[] shape) { return Tensor(data, shape, TensorElementType.Int64); }

        public float[] ReadFloat32(IOrtValue value, out long[] shape)
        {
            var v = ((Value)value).V;
            var info = v.GetTensorTypeAndShape();
            if (info.ElementDataType != TensorElementType.Float)
                throw new RwkvError($"expected a float32 tensor, ONNX Runtime returned {info.ElementDataType}");
            shape = info.Shape;
            return v.GetTensorDataAsSpan<float>().ToArray();
        }

        public void Dispose() { }
    }
}
#endif
