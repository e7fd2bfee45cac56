// Calibration activations as streams of sequences (issue #10: tasks read their
// inputs in micro-batches, so memory does not grow with the number of
// calibration samples). A source holds N sequences of T tokens of width H
// (sequence-major rows of an (N·T, H) fp32 matrix) and hands out any range of
// sequences; a sink takes sequences in order. The artifact store implements
// both over files (worker/artifacts.h); MemoryActivations keeps them in RAM
// (tests, and small in-process runs).
//
// Thread safety: a source's read() is const and may be called concurrently
// unless a subclass says otherwise; a sink is single-threaded.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal::calib {

class ActivationSource {
 public:
  virtual ~ActivationSource() = default;
  virtual int64_t sequences() const = 0;  // N
  virtual int64_t seqlen() const = 0;     // T
  virtual int64_t width() const = 0;      // H
  // Sequences [s0, s0 + n) into out (n·T·H floats). kInvalidInput for a range
  // outside [0, N); kIoError / kCorrupt from files.
  virtual Status read(int64_t s0, int64_t n, float* out) const = 0;
  int64_t seq_elems() const { return seqlen() * width(); }
};

class ActivationSink {
 public:
  virtual ~ActivationSink() = default;
  // Appends the next n sequences (n·T·H floats).
  virtual Status append(const float* x, int64_t n) = 0;
};

// Both: written once (in order), then read any number of times.
class ActivationBuffer : public ActivationSource, public ActivationSink {};

// In memory: (N·T, H) floats.
class MemoryActivations : public ActivationBuffer {
 public:
  MemoryActivations(int64_t T, int64_t H) : T_(T), H_(H) {}
  MemoryActivations(std::vector<float> x, int64_t T, int64_t H)
      : x_(std::move(x)), T_(T), H_(H) {}
  int64_t sequences() const override {
    return T_ * H_ > 0 ? static_cast<int64_t>(x_.size()) / (T_ * H_) : 0;
  }
  int64_t seqlen() const override { return T_; }
  int64_t width() const override { return H_; }
  Status read(int64_t s0, int64_t n, float* out) const override;
  Status append(const float* x, int64_t n) override;
  const std::vector<float>& data() const { return x_; }
  std::vector<float>& data() { return x_; }

 private:
  std::vector<float> x_;
  int64_t T_, H_;
};

// In a temporary file of `dir` (unlinked at once: it disappears with the process or
// this object); reads with pread. Not thread safe while appending.
class ScratchActivations : public ActivationBuffer {
 public:
  static Result<std::unique_ptr<ScratchActivations>> create(const std::string& dir, int64_t T,
                                                            int64_t H);
  ~ScratchActivations() override;
  int64_t sequences() const override { return n_; }
  int64_t seqlen() const override { return T_; }
  int64_t width() const override { return H_; }
  Status read(int64_t s0, int64_t n, float* out) const override;
  Status append(const float* x, int64_t n) override;

 private:
  ScratchActivations(int fd, std::string dir, int64_t T, int64_t H)
      : fd_(fd), dir_(std::move(dir)), T_(T), H_(H) {}
  int fd_;
  std::string dir_;
  int64_t T_, H_, n_ = 0;
};

// A contiguous range [begin, begin + count) of another source's sequences, as a
// source of its own (a rank's shard of the calibration set).
class ShardSource : public ActivationSource {
 public:
  ShardSource(const ActivationSource* base, int64_t begin, int64_t count)
      : base_(base), begin_(begin), count_(count) {}
  int64_t sequences() const override { return count_; }
  int64_t seqlen() const override { return base_->seqlen(); }
  int64_t width() const override { return base_->width(); }
  Status read(int64_t s0, int64_t n, float* out) const override;

 private:
  const ActivationSource* base_;
  int64_t begin_, count_;
};

// A source whose rows are right-multiplied by R (H×H, row-major, fp64) on read,
// in float64 and cast once: FP activations of the original model seen in a
// rotated residual basis (QuaRot / SpinQuant's R1). An empty R is the identity.
class RotatedSource : public ActivationSource {
 public:
  RotatedSource(const ActivationSource* base, const std::vector<double>* R) : base_(base), R_(R) {}
  int64_t sequences() const override { return base_->sequences(); }
  int64_t seqlen() const override { return base_->seqlen(); }
  int64_t width() const override { return base_->width(); }
  Status read(int64_t s0, int64_t n, float* out) const override;

 private:
  const ActivationSource* base_;
  const std::vector<double>* R_;
};

// x (rows, H) ← x·R in float64 (cast once); R (H×H) row-major; empty R: unchanged.
void rotate_rows(float* x, int64_t rows, int64_t H, const std::vector<double>& R);

}  // namespace qcal::calib
