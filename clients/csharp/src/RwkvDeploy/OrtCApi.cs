// The ONNX Runtime C API through P/Invoke: the shared library is opened at run time (dlopen; NativeLibrary under
// .NET), OrtGetApiBase() -> GetApi(version) gives the OrtApi function table, and each function used here is
// read from its slot and called through Marshal.GetDelegateForFunctionPointer. No ONNX Runtime headers or
// managed packages are needed: only the slot numbers below, which ONNX Runtime keeps fixed (the table is
// append-only; they were read from onnxruntime_c_api.h of API version 29 and hold for every version since 14).
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Text;

namespace RwkvDeploy
{
    /// <summary>Raised by the C API backend when ONNX Runtime returns an error status.</summary>
    public class OrtException : Exception
    {
        public readonly int Code;
        public OrtException(int code, string message) : base(message) { Code = code; }
    }

    public sealed class OrtCApiBackend : IOrtBackend
    {
        /// <summary>The OrtApi version asked for: 14 (ONNX Runtime 1.14) is the first with RegisterCustomOpsLibrary_V2,
        /// the newest function used here. Newer libraries serve older versions of the table.</summary>
        public const uint ApiVersion = 14;

        /// <summary>Where the library is looked for when no path is given: the loader's search path.</summary>
        public static string DefaultLibrary
        {
            get
            {
                switch (Environment.OSVersion.Platform)
                {
                    case PlatformID.Win32NT: return "onnxruntime.dll";
                    case PlatformID.MacOSX: return "libonnxruntime.dylib";
                    default: return "libonnxruntime.so";
                }
            }
        }

        // OrtApi slots (index of the function pointer in struct OrtApi)
        const int SlotGetErrorCode = 1, SlotGetErrorMessage = 2, SlotCreateEnv = 3, SlotCreateSession = 7, SlotRun = 9,
            SlotCreateSessionOptions = 10, SlotSetSessionLogSeverityLevel = 22, SlotSetIntraOpNumThreads = 24,
            SlotSessionGetInputCount = 30, SlotSessionGetOutputCount = 31, SlotSessionGetInputTypeInfo = 33,
            SlotSessionGetOutputTypeInfo = 34, SlotSessionGetInputName = 36, SlotSessionGetOutputName = 37,
            SlotCreateTensorAsOrtValue = 48, SlotGetTensorMutableData = 51, SlotCastTypeInfoToTensorInfo = 55,
            SlotGetTensorElementType = 60, SlotGetDimensionsCount = 61, SlotGetDimensions = 62,
            SlotGetTensorTypeAndShape = 65, SlotAllocatorFree = 76, SlotGetAllocatorWithDefaultOptions = 78,
            SlotReleaseEnv = 92, SlotReleaseStatus = 93, SlotReleaseSession = 95, SlotReleaseValue = 96,
            SlotReleaseTypeInfo = 98, SlotReleaseTensorTypeAndShapeInfo = 99, SlotReleaseSessionOptions = 100,
            SlotRegisterCustomOpsLibraryV2 = 228;

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetApiBaseFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetApiFn(uint version);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetVersionStringFn();
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate int GetErrorCodeFn(IntPtr status);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetErrorMessageFn(IntPtr status);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr CreateEnvFn(int level, byte[] logid, out IntPtr env);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr CreateSessionFn(IntPtr env, byte[] path, IntPtr options, out IntPtr session);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr RunFn(IntPtr session, IntPtr runOptions, IntPtr[] inputNames, IntPtr[] inputs, UIntPtr inputCount,
                              IntPtr[] outputNames, UIntPtr outputCount, [In, Out] IntPtr[] outputs);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr CreateSessionOptionsFn(out IntPtr options);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr SetIntOptionFn(IntPtr options, int value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr RegisterLibraryFn(IntPtr options, byte[] path);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetCountFn(IntPtr session, out UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetNameFn(IntPtr session, UIntPtr index, IntPtr allocator, out IntPtr name);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetTypeInfoFn(IntPtr session, UIntPtr index, out IntPtr typeInfo);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr CastTypeInfoFn(IntPtr typeInfo, out IntPtr tensorInfo);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetElementTypeFn(IntPtr info, out int type);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetDimensionsCountFn(IntPtr info, out UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetDimensionsFn(IntPtr info, [Out] long[] dims, UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetTypeAndShapeFn(IntPtr value, out IntPtr info);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        delegate IntPtr CreateTensorFn(IntPtr allocator, long[] shape, UIntPtr shapeLength, int type, out IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetMutableDataFn(IntPtr value, out IntPtr data);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetAllocatorFn(out IntPtr allocator);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr AllocatorFreeFn(IntPtr allocator, IntPtr p);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate void ReleaseFn(IntPtr p);

        readonly GetErrorCodeFn getErrorCode;
        readonly GetErrorMessageFn getErrorMessage;
        readonly CreateSessionFn createSession;
        readonly RunFn run;
        readonly CreateSessionOptionsFn createSessionOptions;
        readonly SetIntOptionFn setLogSeverity, setIntraOpThreads;
        readonly RegisterLibraryFn registerLibrary;
        readonly GetCountFn inputCount, outputCount;
        readonly GetNameFn inputName, outputName;
        readonly GetTypeInfoFn inputTypeInfo, outputTypeInfo;
        readonly CastTypeInfoFn castTypeInfo;
        readonly GetElementTypeFn elementType;
        readonly GetDimensionsCountFn dimensionsCount;
        readonly GetDimensionsFn dimensions;
        readonly GetTypeAndShapeFn typeAndShape;
        readonly CreateTensorFn createTensor;
        readonly GetMutableDataFn mutableData;
        readonly AllocatorFreeFn allocatorFree;
        readonly ReleaseFn releaseEnv, releaseStatus, releaseSession, releaseValue, releaseTypeInfo,
            releaseTensorInfo, releaseSessionOptions;

        readonly IntPtr env, allocator;
        readonly string version;
        public readonly string LibraryName;
        bool disposed;

        /// <summary>Open ONNX Runtime from `library` (a path, or a name for the loader's search path; null:
        /// DefaultLibrary). Errors that the user can fix are RwkvErrors.</summary>
        public OrtCApiBackend(string library)
        {
            LibraryName = string.IsNullOrEmpty(library) ? DefaultLibrary : library;
            string why;
            IntPtr lib = NativeLoader.Load(LibraryName, out why);
            if (lib == IntPtr.Zero)
                throw new RwkvError($"cannot load the ONNX Runtime library {LibraryName} ({why}); pass --ort-lib PATH or " +
                                    "set RWKV_ORT_LIB to a libonnxruntime.so (e.g. onnxruntime/capi/libonnxruntime.so.* " +
                                    "in the Python onnxruntime wheel, or lib/ of an onnxruntime release)");
            IntPtr getApiBase = NativeLoader.Symbol(lib, "OrtGetApiBase");
            if (getApiBase == IntPtr.Zero)
                throw new RwkvError($"{LibraryName} is not an ONNX Runtime library (it has no OrtGetApiBase)");
            IntPtr apiBase = Fn<GetApiBaseFn>(getApiBase)();
            if (apiBase == IntPtr.Zero) throw new RwkvError($"{LibraryName}: OrtGetApiBase() returned nothing");
            var getApi = Fn<GetApiFn>(Marshal.ReadIntPtr(apiBase, 0));
            version = Utf8(Fn<GetVersionStringFn>(Marshal.ReadIntPtr(apiBase, IntPtr.Size))());
            IntPtr api = getApi(ApiVersion);
            if (api == IntPtr.Zero)
                throw new RwkvError($"ONNX Runtime {version} ({LibraryName}) does not serve C API version {ApiVersion}: " +
                                    "this client needs ONNX Runtime 1.14 or newer");

            getErrorCode = Slot<GetErrorCodeFn>(api, SlotGetErrorCode);
            getErrorMessage = Slot<GetErrorMessageFn>(api, SlotGetErrorMessage);
            var createEnv = Slot<CreateEnvFn>(api, SlotCreateEnv);
            createSession = Slot<CreateSessionFn>(api, SlotCreateSession);
            run = Slot<RunFn>(api, SlotRun);
            createSessionOptions = Slot<CreateSessionOptionsFn>(api, SlotCreateSessionOptions);
            setLogSeverity = Slot<SetIntOptionFn>(api, SlotSetSessionLogSeverityLevel);
            setIntraOpThreads = Slot<SetIntOptionFn>(api, SlotSetIntraOpNumThreads);
            registerLibrary = Slot<RegisterLibraryFn>(api, SlotRegisterCustomOpsLibraryV2);
            inputCount = Slot<GetCountFn>(api, SlotSessionGetInputCount);
            outputCount = Slot<GetCountFn>(api, SlotSessionGetOutputCount);
            inputTypeInfo = Slot<GetTypeInfoFn>(api, SlotSessionGetInputTypeInfo);
            outputTypeInfo = Slot<GetTypeInfoFn>(api, SlotSessionGetOutputTypeInfo);
            inputName = Slot<GetNameFn>(api, SlotSessionGetInputName);
            outputName = Slot<GetNameFn>(api, SlotSessionGetOutputName);
            createTensor = Slot<CreateTensorFn>(api, SlotCreateTensorAsOrtValue);
            mutableData = Slot<GetMutableDataFn>(api, SlotGetTensorMutableData);
            castTypeInfo = Slot<CastTypeInfoFn>(api, SlotCastTypeInfoToTensorInfo);
            elementType = Slot<GetElementTypeFn>(api, SlotGetTensorElementType);
            dimensionsCount = Slot<GetDimensionsCountFn>(api, SlotGetDimensionsCount);
            dimensions = Slot<GetDimensionsFn>(api, SlotGetDimensions);
            typeAndShape = Slot<GetTypeAndShapeFn>(api, SlotGetTensorTypeAndShape);
            allocatorFree = Slot<AllocatorFreeFn>(api, SlotAllocatorFree);
            var getAllocator = Slot<GetAllocatorFn>(api, SlotGetAllocatorWithDefaultOptions);
            releaseEnv = Slot<ReleaseFn>(api, SlotReleaseEnv);
            releaseStatus = Slot<ReleaseFn>(api, SlotReleaseStatus);
            releaseSession = Slot<ReleaseFn>(api, SlotReleaseSession);
            releaseValue = Slot<ReleaseFn>(api, SlotReleaseValue);
            releaseTypeInfo = Slot<ReleaseFn>(api, SlotReleaseTypeInfo);
            releaseTensorInfo = Slot<ReleaseFn>(api, SlotReleaseTensorTypeAndShapeInfo);
            releaseSessionOptions = Slot<ReleaseFn>(api, SlotReleaseSessionOptions);

            const int OrtLoggingLevelError = 3;  // warnings (e.g. about unused initializers) would clutter stderr
            Check(createEnv(OrtLoggingLevelError, Utf8Z("rwkv-deploy-cs"), out env));
            Check(getAllocator(out allocator));
        }

        public string Description { get { return $"onnxruntime {version} (C API via P/Invoke, {LibraryName})"; } }
        public string Version { get { return version; } }

        static T Fn<T>(IntPtr p) where T : class
        {
            return (T)(object)Marshal.GetDelegateForFunctionPointer(p, typeof(T));
        }

        static T Slot<T>(IntPtr api, int slot) where T : class
        {
            IntPtr p = Marshal.ReadIntPtr(api, slot * IntPtr.Size);
            if (p == IntPtr.Zero) throw new RwkvError($"ONNX Runtime's C API has no function in slot {slot}");
            return Fn<T>(p);
        }

        internal static byte[] Utf8Z(string s) { return Encoding.UTF8.GetBytes(s + "\0"); }

        internal static string Utf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }

        /// <summary>Turn an OrtStatus* into an OrtException (and free it); null means success.</summary>
        internal void Check(IntPtr status)
        {
            if (status == IntPtr.Zero) return;
            int code = getErrorCode(status);
            string message = Utf8(getErrorMessage(status));
            releaseStatus(status);
            throw new OrtException(code, message);
        }

        public IOrtModel Load(string modelPath, ModelOptions options)
        {
            IntPtr opts;
            Check(createSessionOptions(out opts));
            try
            {
                Check(setLogSeverity(opts, 3));
                if (options != null && options.Threads > 0) Check(setIntraOpThreads(opts, options.Threads));
                if (options != null && options.CustomOpsLibrary != null) Check(registerLibrary(opts, Utf8Z(options.CustomOpsLibrary)));
                IntPtr session;
                Check(createSession(env, Utf8Z(modelPath), opts, out session));
                try
                {
                    return new Model(this, session);
                }
                catch
                {
                    releaseSession(session);
                    throw;
                }
            }
            finally
            {
                releaseSessionOptions(opts);
            }
        }

        sealed class Value : IOrtValue
        {
            internal IntPtr Handle;
            readonly OrtCApiBackend owner;
            internal Value(OrtCApiBackend owner, IntPtr handle) { this.owner = owner; Handle = handle; }
            public void Dispose()
            {
                if (Handle != IntPtr.Zero) owner.releaseValue(Handle);
                Handle = IntPtr.Zero;
            }
        }

        sealed class Model : IOrtModel
        {
            readonly OrtCApiBackend b;
            IntPtr session;
            readonly List<IoSpec> inputs = new List<IoSpec>(), outputs = new List<IoSpec>();
            readonly Dictionary<string, IntPtr> names = new Dictionary<string, IntPtr>();  // UTF-8 copies for Run

            internal Model(OrtCApiBackend b, IntPtr session)
            {
                this.b = b;
                this.session = session;
                Describe(b.inputCount, b.inputName, b.inputTypeInfo, inputs);
                Describe(b.outputCount, b.outputName, b.outputTypeInfo, outputs);
            }

            void Describe(GetCountFn count, GetNameFn name, GetTypeInfoFn typeInfo, List<IoSpec> into)
            {
                UIntPtr n;
                b.Check(count(session, out n));
                for (ulong i = 0; i < n.ToUInt64(); i++)
                {
                    IntPtr p;
                    b.Check(name(session, (UIntPtr)i, b.allocator, out p));
                    var spec = new IoSpec { Name = Utf8(p) };
                    b.Check(b.allocatorFree(b.allocator, p));
                    IntPtr info;
                    b.Check(typeInfo(session, (UIntPtr)i, out info));
                    try
                    {
                        IntPtr tensor;  // owned by info; null when the value is not a tensor
                        b.Check(b.castTypeInfo(info, out tensor));
                        if (tensor != IntPtr.Zero)
                        {
                            int type;
                            b.Check(b.elementType(tensor, out type));
                            spec.OnnxType = type;
                            UIntPtr rank;
                            b.Check(b.dimensionsCount(tensor, out rank));
                            if (rank.ToUInt64() > 0)
                            {
                                spec.Dims = new long[rank.ToUInt64()];
                                b.Check(b.dimensions(tensor, spec.Dims, rank));
                            }
                        }
                    }
                    finally
                    {
                        b.releaseTypeInfo(info);
                    }
                    into.Add(spec);
                }
            }

            public IList<IoSpec> Inputs { get { return inputs; } }
            public IList<IoSpec> Outputs { get { return outputs; } }

            IntPtr Name(string s)
            {
                IntPtr p;
                if (!names.TryGetValue(s, out p))
                {
                    byte[] z = Utf8Z(s);
                    p = Marshal.AllocHGlobal(z.Length);
                    Marshal.Copy(z, 0, p, z.Length);
                    names[s] = p;
                }
                return p;
            }

            public IOrtValue[] Run(string[] inputNames, IOrtValue[] inputValues, string[] outputNames)
            {
                var inNames = new IntPtr[inputNames.Length];
                var ins = new IntPtr[inputValues.Length];
                for (int i = 0; i < inputNames.Length; i++)
                {
                    inNames[i] = Name(inputNames[i]);
                    ins[i] = ((Value)inputValues[i]).Handle;
                }
                var outNames = new IntPtr[outputNames.Length];
                for (int i = 0; i < outputNames.Length; i++) outNames[i] = Name(outputNames[i]);
                var outs = new IntPtr[outputNames.Length];
                b.Check(b.run(session, IntPtr.Zero, inNames, ins, (UIntPtr)ins.Length, outNames, (UIntPtr)outs.Length, outs));
                var result = new IOrtValue[outs.Length];
                for (int i = 0; i < outs.Length; i++) result[i] = new Value(b, outs[i]);
                return result;
            }

            public void Dispose()
            {
                if (session != IntPtr.Zero) b.releaseSession(session);
                session = IntPtr.Zero;
                foreach (var p in names.Values) Marshal.FreeHGlobal(p);
                names.Clear();
            }
        }

        IntPtr NewTensor(long[] shape, ElemType type, out IntPtr data)
        {
            IntPtr value;
            Check(createTensor(allocator, shape, (UIntPtr)shape.Length, (int)type, out value));
            try
            {
                Check(mutableData(value, out data));
            }
            catch
            {
                releaseValue(value);
                throw;
            }
            return value;
        }

        static long Count(long[] shape)
        {
            long n = 1;
            foreach (long d in shape) n *= d;
            return n;
        }

        public IOrtValue FromFloat32(float[] values, long[] shape)
        {
            if (Count(shape) != values.Length) throw new ArgumentException("shape does not match the data");
            IntPtr data;
            IntPtr v = NewTensor(shape, ElemType.Float32, out data);
            if (values.Length > 0) Marshal.Copy(values, 0, data, values.Length);
            return new Value(this, v);
        }

        public IOrtValue FromFloat16(ushort[] bits, long[] shape)
        {
            if (Count(shape) != bits.Length) throw new ArgumentException("shape does not match the data");
            IntPtr data;
            IntPtr v = NewTensor(shape, ElemType.Float16, out data);
            var signed = new short[bits.Length];
            Buffer.BlockCopy(bits, 0, signed, 0, bits.Length * 2);
            if (bits.Length > 0) Marshal.Copy(signed, 0, data, signed.Length);
            return new Value(this, v);
        }

        public IOrtValue FromInt64(long[] values, long[] shape)
        {
            if (Count(shape) != values.Length) throw new ArgumentException("shape does not match the data");
            IntPtr data;
            IntPtr v = NewTensor(shape, ElemType.Int64, out data);
            if (values.Length > 0) Marshal.Copy(values, 0, data, values.Length);
            return new Value(this, v);
        }

        public float[] ReadFloat32(IOrtValue value, out long[] shape)
        {
            IntPtr handle = ((Value)value).Handle;
            IntPtr info;
            Check(typeAndShape(handle, out info));
            try
            {
                int type;
                Check(elementType(info, out type));
                if (type != (int)ElemType.Float32)
                    throw new RwkvError($"expected a float32 tensor, ONNX Runtime returned {ElemTypes.NameOf(type)}");
                UIntPtr rank;
                Check(dimensionsCount(info, out rank));
                shape = new long[rank.ToUInt64()];
                if (shape.Length > 0) Check(dimensions(info, shape, rank));
            }
            finally
            {
                releaseTensorInfo(info);
            }
            long n = Count(shape);
            var result = new float[n];
            IntPtr data;
            Check(mutableData(handle, out data));
            if (n > 0) Marshal.Copy(data, result, 0, (int)n);
            return result;
        }

        public void Dispose()
        {
            if (disposed) return;
            disposed = true;
            releaseEnv(env);
        }
    }

    /// <summary>Opening a shared library by path or name at run time, and finding a symbol in it.</summary>
    static class NativeLoader
    {
        public static IntPtr Load(string name, out string error)
        {
            error = null;
#if NETCOREAPP
            try { return System.Runtime.InteropServices.NativeLibrary.Load(name); }
            catch (Exception e) { error = e.Message; return IntPtr.Zero; }
#else
            const int RTLD_NOW = 2;
            IntPtr h;
            try
            {
                h = LibDl.dlopen(name, RTLD_NOW);
                if (h == IntPtr.Zero) error = OrtCApiBackend.Utf8(LibDl.dlerror());
            }
            catch (DllNotFoundException)  // no libdl.so.2: glibc 2.34+ has dlopen in libc itself
            {
                h = LibC.dlopen(name, RTLD_NOW);
                if (h == IntPtr.Zero) error = OrtCApiBackend.Utf8(LibC.dlerror());
            }
            return h;
#endif
        }

        public static IntPtr Symbol(IntPtr lib, string name)
        {
#if NETCOREAPP
            IntPtr p;
            return System.Runtime.InteropServices.NativeLibrary.TryGetExport(lib, name, out p) ? p : IntPtr.Zero;
#else
            try { return LibDl.dlsym(lib, name); }
            catch (DllNotFoundException) { return LibC.dlsym(lib, name); }
#endif
        }

#if !NETCOREAPP
        static class LibDl
        {
            [DllImport("libdl.so.2")] public static extern IntPtr dlopen(string file, int mode);
            [DllImport("libdl.so.2")] public static extern IntPtr dlsym(IntPtr handle, string name);
            [DllImport("libdl.so.2")] public static extern IntPtr dlerror();
        }

        static class LibC
        {
            [DllImport("libc.so.6")] public static extern IntPtr dlopen(string file, int mode);
            [DllImport("libc.so.6")] public static extern IntPtr dlsym(IntPtr handle, string name);
            [DllImport("libc.so.6")] public static extern IntPtr dlerror();
        }
#endif
    }
}
