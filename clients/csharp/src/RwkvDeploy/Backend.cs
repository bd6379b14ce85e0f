// The small interface between the RWKV logic (manifest, state loop, tokenizers, sampling, golden check) and
// an ONNX Runtime binding. Two bindings implement it:
//   OrtCApi.cs   - the ONNX Runtime C API through P/Invoke (runs under mono and .NET; what is tested here)
//   OrtDotnet.cs - the official Microsoft.ML.OnnxRuntime package (compiled only with RWKV_MSORT, by dotnet)
using System;
using System.Collections.Generic;

namespace RwkvDeploy
{
    /// <summary>Tensor element types, numbered as ONNX numbers them (ONNXTensorElementDataType).</summary>
    public enum ElemType
    {
        Float32 = 1,
        Int64 = 7,
        Float16 = 10,
    }

    public static class ElemTypes
    {
        /// <summary>The manifest's dtype name -> ElemType, or null for a name this client cannot feed.</summary>
        public static ElemType? FromName(string name)
        {
            switch (name)
            {
                case "float32": return ElemType.Float32;
                case "float16": return ElemType.Float16;
                case "int64": return ElemType.Int64;
                default: return null;
            }
        }

        public static string Name(ElemType t)
        {
            switch (t)
            {
                case ElemType.Float32: return "float32";
                case ElemType.Float16: return "float16";
                case ElemType.Int64: return "int64";
                default: return t.ToString();
            }
        }

        /// <summary>An ONNX element type number as a manifest dtype name ("tensor type 11" for others).</summary>
        public static string NameOf(int onnxType)
        {
            return Enum.IsDefined(typeof(ElemType), onnxType) ? Name((ElemType)onnxType) : "tensor type " + onnxType;
        }

        public static int Size(ElemType t)
        {
            return t == ElemType.Float16 ? 2 : t == ElemType.Float32 ? 4 : 8;
        }
    }

    /// <summary>One input or output of a graph, as the runtime reports it. Dims: -1 where symbolic (the batch).
    /// OnnxType is the ONNX element type number (0 when the value is not a tensor).</summary>
    public sealed class IoSpec
    {
        public string Name;
        public int OnnxType;
        public long[] Dims;  // null when the rank is unknown
    }

    /// <summary>Session options this client sets.</summary>
    public sealed class ModelOptions
    {
        public int Threads;               // intra-op threads; 0 = ONNX Runtime's default
        public string CustomOpsLibrary;   // a custom-op library to register (already checked), or null
    }

    /// <summary>A tensor owned by the runtime (ONNX Runtime memory); dispose it when done.</summary>
    public interface IOrtValue : IDisposable
    {
    }

    /// <summary>One loaded ONNX graph.</summary>
    public interface IOrtModel : IDisposable
    {
        IList<IoSpec> Inputs { get; }
        IList<IoSpec> Outputs { get; }

        /// <summary>Run the graph: new values for `outputNames`, owned by the caller. Inputs are not consumed.</summary>
        IOrtValue[] Run(string[] inputNames, IOrtValue[] inputs, string[] outputNames);
    }

    /// <summary>An ONNX Runtime binding: loads graphs, makes input tensors, reads output tensors.</summary>
    public interface IOrtBackend : IDisposable
    {
        /// <summary>What runs, in words (e.g. "onnxruntime 1.32.0 (C API)").</summary>
        string Description { get; }

        IOrtModel Load(string modelPath, ModelOptions options);

        IOrtValue FromFloat32(float[] data, long[] shape);
        IOrtValue FromFloat16(ushort[] bits, long[] shape);
        IOrtValue FromInt64(long[] data, long[] shape);

        /// <summary>The values of a float32 tensor, and its shape.</summary>
        float[] ReadFloat32(IOrtValue value, out long[] shape);
    }

    /// <summary>IEEE 754 binary16 conversions (fp16 tensors are fed and kept as their ushort bits).</summary>
    public static class Half
    {
        public static ushort FromFloat(float value)
        {
            uint x = BitConverter.ToUInt32(BitConverter.GetBytes(value), 0);
            uint sign = (x >> 16) & 0x8000u;
            int exp = (int)((x >> 23) & 0xff);
            uint mant = x & 0x7fffffu;
            if (exp == 0xff) return (ushort)(sign | 0x7c00u | (mant != 0 ? 0x200u | (mant >> 13) : 0u));  // inf / NaN
            int e = exp - 127 + 15;
            if (e >= 0x1f) return (ushort)(sign | 0x7c00u);  // overflow -> inf
            if (e <= 0)
            {
                if (e < -10) return (ushort)sign;  // underflow -> signed zero
                mant |= 0x800000u;  // subnormal half: shift the implicit bit in, round to nearest even
                int shift = 14 - e;
                uint half = mant >> shift;
                uint rem = mant & ((1u << shift) - 1);
                uint mid = 1u << (shift - 1);
                if (rem > mid || (rem == mid && (half & 1) != 0)) half++;
                return (ushort)(sign | half);
            }
            uint h = sign | ((uint)e << 10) | (mant >> 13);
            uint r = mant & 0x1fffu;
            if (r > 0x1000u || (r == 0x1000u && (h & 1) != 0)) h++;  // may carry into the exponent: still right
            return (ushort)h;
        }

        public static float ToFloat(ushort h)
        {
            uint sign = (uint)(h & 0x8000) << 16;
            int exp = (h >> 10) & 0x1f;
            uint mant = (uint)(h & 0x3ff);
            uint bits;
            if (exp == 0x1f) bits = sign | 0x7f800000u | (mant << 13);
            else if (exp == 0)
            {
                if (mant == 0) bits = sign;
                else
                {
                    int e = -1;
                    do { mant <<= 1; e++; } while ((mant & 0x400) == 0);
                    bits = sign | (uint)(127 - 15 - e) << 23 | ((mant & 0x3ff) << 13);
                }
            }
            else bits = sign | (uint)(exp - 15 + 127) << 23 | (mant << 13);
            return BitConverter.ToSingle(BitConverter.GetBytes(bits), 0);
        }
    }
}
