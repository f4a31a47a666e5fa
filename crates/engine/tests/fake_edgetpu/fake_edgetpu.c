/* A stand-in for Coral's libedgetpu.so.1, built by the classic backend's tests.
 *
 * It exports libedgetpu's C API (edgetpu_c.h: list/free devices, create/free delegate, version)
 * and returns a real TfLiteDelegate that claims every `edgetpu-custom-op` node of the graph, as
 * the real delegate does, and runs it on the CPU as a plain copy of its input (the fixture's
 * compiled graph is one reshape). -DFAKE_EDGETPU_MODE='"..."' picks the behaviour:
 *   "ok" (default)  one USB device, a working delegate;
 *   "no-device"     edgetpu_list_devices finds nothing;
 *   "fail"          edgetpu_create_delegate returns NULL (device busy, firmware error).
 *
 * The TFLite structs are the TensorFlow 2.6 layouts of tensorflow/lite/c/common.h (the library the
 * classic backend is tested against); only the leading members this file reads are declared where
 * TFLite owns the memory, whole structs where this file creates or passes them by value.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct TfLiteIntArray {
  int size;
  int data[];
} TfLiteIntArray;

typedef struct TfLiteTensor {
  int type;
  void *data;
  TfLiteIntArray *dims;
  float scale;
  int32_t zero_point;
  int allocation_type;
  size_t bytes;
  unsigned char rest[112 - 48];
} TfLiteTensor;
_Static_assert(sizeof(TfLiteTensor) == 112, "TfLiteTensor of TensorFlow Lite 2.6");

typedef struct TfLiteNode {
  TfLiteIntArray *inputs;
  TfLiteIntArray *outputs;
} TfLiteNode;

struct TfLiteRegistration;
struct TfLiteDelegate;

typedef struct TfLiteContext {
  size_t tensors_size;
  int (*GetExecutionPlan)(struct TfLiteContext *, TfLiteIntArray **);
  TfLiteTensor *tensors;
  void *impl_;
  void *ResizeTensor;
  void *ReportError;
  void *AddTensors;
  int (*GetNodeAndRegistration)(struct TfLiteContext *, int, TfLiteNode **,
                                struct TfLiteRegistration **);
  int (*ReplaceNodeSubsetsWithDelegateKernels)(struct TfLiteContext *, struct TfLiteRegistration,
                                               const TfLiteIntArray *, struct TfLiteDelegate *);
} TfLiteContext;

typedef struct TfLiteRegistration {
  void *(*init)(TfLiteContext *, const char *, size_t);
  void (*free)(TfLiteContext *, void *);
  int (*prepare)(TfLiteContext *, TfLiteNode *);
  int (*invoke)(TfLiteContext *, TfLiteNode *);
  const char *(*profiling_string)(const TfLiteContext *, const TfLiteNode *);
  int32_t builtin_code;
  const char *custom_name;
  int version;
} TfLiteRegistration;
_Static_assert(sizeof(TfLiteRegistration) == 64, "TfLiteRegistration of TensorFlow Lite 2.6");

typedef struct TfLiteDelegate {
  void *data_;
  int (*Prepare)(TfLiteContext *, struct TfLiteDelegate *);
  void *CopyFromBufferHandle;
  void *CopyToBufferHandle;
  void *FreeBufferHandle;
  int64_t flags;
} TfLiteDelegate;

enum { kTfLiteOk = 0, kTfLiteError = 1 };
enum edgetpu_device_type { EDGETPU_APEX_PCI = 0, EDGETPU_APEX_USB = 1 };
struct edgetpu_device {
  enum edgetpu_device_type type;
  const char *path;
};
struct edgetpu_option {
  const char *name;
  const char *value;
};

#ifndef FAKE_EDGETPU_MODE
#define FAKE_EDGETPU_MODE "ok"
#endif

static const char *mode(void) { return FAKE_EDGETPU_MODE; }

static int kernel_invoke(TfLiteContext *context, TfLiteNode *node) {
  if (node->inputs->size != 1 || node->outputs->size != 1) return kTfLiteError;
  const TfLiteTensor *in = &context->tensors[node->inputs->data[0]];
  TfLiteTensor *out = &context->tensors[node->outputs->data[0]];
  if (in->bytes != out->bytes || !in->data || !out->data) return kTfLiteError;
  memcpy(out->data, in->data, in->bytes);
  return kTfLiteOk;
}

static int kernel_prepare(TfLiteContext *context, TfLiteNode *node) {
  (void)context;
  (void)node;
  return kTfLiteOk;
}

static int delegate_prepare(TfLiteContext *context, TfLiteDelegate *delegate) {
  TfLiteIntArray *plan = NULL;
  if (context->GetExecutionPlan(context, &plan) != kTfLiteOk) return kTfLiteError;
  TfLiteIntArray *claimed = malloc(sizeof(int) * (size_t)(plan->size + 1));
  if (!claimed) return kTfLiteError;
  claimed->size = 0;
  for (int i = 0; i < plan->size; i++) {
    TfLiteNode *node = NULL;
    TfLiteRegistration *reg = NULL;
    if (context->GetNodeAndRegistration(context, plan->data[i], &node, &reg) != kTfLiteOk) {
      free(claimed);
      return kTfLiteError;
    }
    if (reg->custom_name && strcmp(reg->custom_name, "edgetpu-custom-op") == 0) {
      claimed->data[claimed->size++] = plan->data[i];
    }
  }
  int status = kTfLiteOk;
  if (claimed->size > 0) {
    TfLiteRegistration kernel;
    memset(&kernel, 0, sizeof kernel);
    kernel.prepare = kernel_prepare;
    kernel.invoke = kernel_invoke;
    kernel.custom_name = "fake-edgetpu";
    kernel.version = 1;
    status = context->ReplaceNodeSubsetsWithDelegateKernels(context, kernel, claimed, delegate);
  }
  free(claimed);
  return status;
}

static struct edgetpu_device devices[1] = {{EDGETPU_APEX_USB, "/sys/bus/usb/devices/fake"}};

struct edgetpu_device *edgetpu_list_devices(size_t *num_devices) {
  if (strcmp(mode(), "no-device") == 0) {
    *num_devices = 0;
    return NULL;
  }
  *num_devices = 1;
  return devices;
}

void edgetpu_free_devices(struct edgetpu_device *dev) { (void)dev; }

TfLiteDelegate *edgetpu_create_delegate(enum edgetpu_device_type type, const char *name,
                                        const struct edgetpu_option *options,
                                        size_t num_options) {
  (void)options;
  (void)num_options;
  if (strcmp(mode(), "fail") == 0 || type != EDGETPU_APEX_USB || !name ||
      strcmp(name, devices[0].path) != 0) {
    return NULL;
  }
  TfLiteDelegate *delegate = calloc(1, sizeof *delegate);
  if (delegate) delegate->Prepare = delegate_prepare;
  return delegate;
}

void edgetpu_free_delegate(TfLiteDelegate *delegate) { free(delegate); }

void edgetpu_verbosity(int verbosity) { (void)verbosity; }

const char *edgetpu_version(void) {
  return "BuildLabel(fake libedgetpu for dermedge tests), RuntimeVersion(14)";
}
