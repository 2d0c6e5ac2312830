// DeepSeek-V4 chat rendering and the assistant loss mask against the reference renderer + `tokenizers`
// (tests/fixtures/data/chat_cases.jsonl), plus the mask policies and errors.
#include <gtest/gtest.h>

#include "data/chat.h"
#include "data/tokenizer.h"
#include "data_test_util.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
using test::fixture;

std::vector<ChatMessage> messages_of(const nlohmann::json& j) {
  std::vector<ChatMessage> out;
  for (const auto& m : j) {
    ChatMessage c;
    c.role = m["role"];
    c.content = m.value("content", "");
    c.reasoning_content = m.value("reasoning_content", "");
    out.push_back(c);
  }
  return out;
}

TEST(Chat, ParityWithReferenceRendererAndMask) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  int64_t n = 0, text_ok = 0, ids_ok = 0, mask_ok = 0;
  for (const auto& row : test::read_jsonl(fixture("chat_cases.jsonl"))) {
    ChatOptions o;
    o.thinking = parse_thinking_mode(row["thinking_mode"]);
    o.drop_thinking = row["drop_thinking"];
    const auto msgs = messages_of(row["messages"]);
    const std::string text = render_chat_text(msgs, o);
    const EncodedChat e = encode_chat(tok, msgs, o);
    ++n;
    text_ok += text == row["text"].get<std::string>();
    ids_ok += e.ids == row["ids"].get<std::vector<int32_t>>();
    mask_ok += e.loss_mask == row["mask"].get<std::vector<uint8_t>>();
    EXPECT_EQ(text, row["text"].get<std::string>());
    EXPECT_EQ(e.ids, row["ids"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(e.loss_mask, row["mask"].get<std::vector<uint8_t>>()) << text;
  }
  std::printf("[ parity ] chat: %lld/%lld texts, %lld/%lld id sequences, %lld/%lld loss masks identical\n",
              static_cast<long long>(text_ok), static_cast<long long>(n), static_cast<long long>(ids_ok),
              static_cast<long long>(n), static_cast<long long>(mask_ok), static_cast<long long>(n));
  EXPECT_GE(n, 40);
}

TEST(Chat, FormatOfOneTurn) {
  const std::vector<ChatMessage> msgs = {{"system", "S", ""}, {"user", "Q", ""}, {"assistant", "A", "R"}};
  ChatOptions o;
  EXPECT_EQ(render_chat_text(msgs, o),
            "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜></think>A<｜end▁of▁sentence｜>");
  o.thinking = ThinkingMode::kThinking;
  EXPECT_EQ(render_chat_text(msgs, o),
            "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜><think>R</think>A<｜end▁of▁sentence｜>");
  o.add_bos = false;
  const auto segs = render_chat(msgs, o);
  ASSERT_EQ(segs.size(), 4u);
  EXPECT_EQ(segs[3].assistant_turn, 0);
  EXPECT_EQ(segs[3].text, "R</think>A<｜end▁of▁sentence｜>");
}

TEST(Chat, MaskPolicies) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  const std::vector<ChatMessage> msgs = {
      {"user", "one", ""}, {"assistant", "first answer", ""}, {"user", "two", ""}, {"assistant", "second", ""}};
  const int32_t eos = *tok.token_to_id("<｜end▁of▁sentence｜>");
  const int32_t think_end = *tok.token_to_id("</think>");
  ChatOptions o;
  const EncodedChat all_turns = encode_chat(tok, msgs, o);
  // Every EOS closes an assistant turn and is a target; "</think>" here belongs to the prompt.
  int eos_seen = 0;
  for (size_t i = 0; i < all_turns.ids.size(); ++i) {
    if (all_turns.ids[i] == eos) {
      EXPECT_EQ(all_turns.loss_mask[i], 1);
      ++eos_seen;
    }
    if (all_turns.ids[i] == think_end) {
      EXPECT_EQ(all_turns.loss_mask[i], 0);
    }
  }
  EXPECT_EQ(eos_seen, 2);
  EXPECT_EQ(all_turns.loss_mask.front(), 0);  // BOS
  o.mask = LossMaskPolicy::kLastAssistant;
  const EncodedChat last = encode_chat(tok, msgs, o);
  EXPECT_EQ(last.ids, all_turns.ids);
  int trained_all = 0, trained_last = 0;
  for (size_t i = 0; i < last.ids.size(); ++i) {
    trained_all += all_turns.loss_mask[i];
    trained_last += last.loss_mask[i];
    EXPECT_LE(last.loss_mask[i], all_turns.loss_mask[i]);
  }
  EXPECT_GT(trained_last, 0);
  EXPECT_LT(trained_last, trained_all);
  // The decoded trained tokens of the last policy are exactly the last answer.
  std::vector<int32_t> trained;
  for (size_t i = 0; i < last.ids.size(); ++i)
    if (last.loss_mask[i]) trained.push_back(last.ids[i]);
  EXPECT_EQ(tok.decode(trained), "second<｜end▁of▁sentence｜>");
  o.mask = LossMaskPolicy::kAll;
  const EncodedChat every = encode_chat(tok, msgs, o);
  for (uint8_t m : every.loss_mask) EXPECT_EQ(m, 1);
}

TEST(Chat, Errors) {
  const Tokenizer tok = Tokenizer::from_file(fixture("tokenizer.json"));
  EXPECT_THROW(render_chat({{"tool", "x", ""}}, {}), Error);
  EXPECT_THROW(parse_thinking_mode("deep"), Error);
  EXPECT_THROW(parse_mask_policy("user"), Error);
  ChatTokens bad;
  bad.user = "<｜NoSuchToken｜>";
  try {
    encode_chat(tok, {{"user", "x", ""}, {"assistant", "y", ""}}, {}, bad);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NoSuchToken"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv4::data
