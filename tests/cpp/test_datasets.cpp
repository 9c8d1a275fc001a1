// The dataset readers on files the test writes: CIFAR binary (good, truncated,
// bad label, missing), the MNIST family by name, and the image fitting.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "data/cifar.h"
#include "data/datasets.h"

#include "test_util.h"

namespace {

using fxp::testing::expect_error;
using fxp::testing::idx_bytes;

// Note: no std::filesystem here (see test_idx.cpp).
class Datasets : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/fxp_datasets_test_XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    for (auto it = paths_.rbegin(); it != paths_.rend(); ++it) {
      if (std::remove(it->c_str()) != 0) ::rmdir(it->c_str());
    }
    ::rmdir(dir_.c_str());
  }

  std::string write(const std::string& name, const std::vector<uint8_t>& bytes) {
    paths_.push_back(dir_ + "/" + name);
    std::ofstream(paths_.back(), std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return paths_.back();
  }
  std::string subdir(const std::string& name) {
    paths_.push_back(dir_ + "/" + name);
    ::mkdir(paths_.back().c_str(), 0700);
    return paths_.back();
  }

  // n CIFAR records: labels from `labels` (each record gets label_bytes bytes,
  // the last one the label), pixel p of record r = (r + p) % 256.
  static std::vector<uint8_t> cifar(const std::vector<std::vector<uint8_t>>& labels) {
    std::vector<uint8_t> out;
    for (size_t r = 0; r < labels.size(); ++r) {
      out.insert(out.end(), labels[r].begin(), labels[r].end());
      for (int p = 0; p < 3072; ++p) out.push_back(static_cast<uint8_t>((r + p) % 256));
    }
    return out;
  }

  // An IDX file of uint8 data with dims.
  std::string dir_;
  std::vector<std::string> paths_;
};

TEST_F(Datasets, CifarTenRecordsAndLayout) {
  const auto path = write("b.bin", cifar({{3}, {9}}));
  const auto s = fxp::data::read_cifar_files({path}, 1, 10);
  EXPECT_EQ(s.images.sizes(), (std::vector<int64_t>{2, 3, 32, 32}));
  EXPECT_TRUE(torch::equal(s.labels, torch::tensor({3, 9}, torch::kLong)));
  // Channel-major: pixel 1024 of record 1 is green (0, 0).
  EXPECT_EQ(s.images[1][1][0][0].item<int>(), (1 + 1024) % 256);
  EXPECT_EQ(s.images[0][2][31][31].item<int>(), 3071 % 256);
}

TEST_F(Datasets, CifarHundredKeepsTheFineLabel) {
  const auto path = write("train.bin", cifar({{19, 77}, {0, 99}}));
  const auto s = fxp::data::read_cifar_files({path}, 2, 100);
  EXPECT_TRUE(torch::equal(s.labels, torch::tensor({77, 99}, torch::kLong)));
}

TEST_F(Datasets, CifarErrorsNameTheFile) {
  auto bytes = cifar({{1}, {2}});
  bytes.pop_back();
  const auto truncated = write("truncated.bin", bytes);
  expect_error([&] { fxp::data::read_cifar_files({truncated}, 1, 10); },
               truncated + ": 6145 bytes is not a whole number of 3073-byte records");
  const auto bad_label = write("label.bin", cifar({{1}, {10}}));
  expect_error([&] { fxp::data::read_cifar_files({bad_label}, 1, 10); },
               bad_label + ": record 1 has label 10, but the dataset has 10 classes");
  const auto empty = write("empty.bin", {});
  expect_error([&] { fxp::data::read_cifar_files({empty}, 1, 10); }, empty + ": empty CIFAR file");
  expect_error([&] { fxp::data::read_cifar_files({dir_ + "/nothing.bin"}, 1, 10); },
               "cannot open CIFAR file " + dir_ + "/nothing.bin");
  // CIFAR-100 records read as CIFAR-10 have the wrong size.
  const auto hundred = write("hundred.bin", cifar({{1, 2}}));
  expect_error([&] { fxp::data::read_cifar_files({hundred}, 1, 10); }, "not a whole number of 3073-byte records");
}

TEST_F(Datasets, CifarSplitsByName) {
  const std::string base = subdir("cifar-10-batches-bin");
  for (int i = 1; i <= 5; ++i) write("cifar-10-batches-bin/data_batch_" + std::to_string(i) + ".bin", cifar({{static_cast<uint8_t>(i)}}));
  write("cifar-10-batches-bin/test_batch.bin", cifar({{7}, {8}}));
  const auto train = fxp::data::read_dataset_split("cifar10", dir_, true);  // finds the archive's folder
  EXPECT_TRUE(torch::equal(train.labels, torch::tensor({1, 2, 3, 4, 5}, torch::kLong)));
  EXPECT_EQ(fxp::data::read_dataset_split("cifar10", base, false).labels.size(0), 2);
  expect_error([&] { fxp::data::read_dataset_split("cifar100", dir_, true); },
               "missing dataset file " + dir_ + "/train.bin; get it with: scripts/get_data.sh cifar100 " + dir_);
  // The hint says when the directory itself is missing.
  expect_error([&] { fxp::data::read_dataset_split("cifar100", dir_ + "/nowhere", true); },
               "; the directory " + dir_ + "/nowhere does not exist; get it with: scripts/get_data.sh cifar100 " + dir_ +
                   "/nowhere");
}

TEST_F(Datasets, MnistFamilyByName) {
  std::vector<uint8_t> pixels(2 * 28 * 28);
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<uint8_t>(i % 251);
  write("emnist-balanced-test-images-idx3-ubyte", idx_bytes(0x08, {2, 28, 28}, pixels));
  write("emnist-balanced-test-labels-idx1-ubyte", idx_bytes(0x08, {2}, {46, 3}));
  const auto s = fxp::data::read_dataset_split("emnist", dir_, false);
  EXPECT_EQ(s.images.sizes(), (std::vector<int64_t>{2, 1, 28, 28}));
  // EMNIST is stored transposed: row 0, column 1 of the result is the file's row 1, column 0.
  EXPECT_EQ(s.images[0][0][0][1].item<int>(), 28 % 251);
  EXPECT_TRUE(torch::equal(s.labels, torch::tensor({46, 3}, torch::kLong)));

  write("t10k-images-idx3-ubyte", idx_bytes(0x08, {2, 28, 28}, pixels));
  write("t10k-labels-idx1-ubyte", idx_bytes(0x08, {2}, {9, 10}));
  expect_error([&] { fxp::data::read_dataset_split("mnist", dir_, false); },
               dir_ + "/t10k-labels-idx1-ubyte has label 10, but the dataset has 10 classes");
  expect_error([&] { fxp::data::read_dataset_split("mnist", dir_, true); },
               "train-images-idx3-ubyte.gz); get it with: scripts/get_data.sh mnist " + dir_);
  expect_error([&] { fxp::data::read_dataset_split("svhn", dir_, true); },
               "dataset must be one of fashion-mnist, mnist, emnist, cifar10, cifar100, but got 'svhn'");
}

TEST(DatasetTable, ShapesAndClasses) {
  EXPECT_EQ(fxp::data::dataset_info("emnist").classes, 47);
  EXPECT_EQ(fxp::data::dataset_info("cifar100").classes, 100);
  EXPECT_EQ(fxp::data::dataset_info("cifar10").channels, 3);
  EXPECT_EQ(fxp::data::dataset_info("fashion-mnist").default_dir, "/usr/share/datasets/fashion-mnist");
}

TEST(FitImages, PadsAndCropsAroundTheCentre) {
  const auto x = torch::arange(2 * 28 * 28).reshape({1, 2, 28, 28}).to(torch::kByte);
  const auto padded = fxp::data::fit_images(x, 32);
  EXPECT_EQ(padded.sizes(), (std::vector<int64_t>{1, 2, 32, 32}));
  EXPECT_TRUE(torch::equal(padded.narrow(2, 2, 28).narrow(3, 2, 28), x));
  EXPECT_EQ(padded.sum().item<int64_t>(), x.sum().item<int64_t>());  // zeros around
  EXPECT_TRUE(torch::equal(fxp::data::fit_images(padded, 28), x));
  EXPECT_TRUE(torch::equal(fxp::data::fit_images(x, 28), x));
}

}  // namespace
