#include "data/chat.h"

#include <algorithm>

#include "data/tokenizer.h"
#include "runtime/error.h"

namespace dsv4::data {
namespace {
bool is_user_like(const std::string& role) { return role == "user" || role == "developer"; }

int last_user_index(const std::vector<ChatMessage>& m) {
  for (int i = static_cast<int>(m.size()) - 1; i >= 0; --i)
    if (is_user_like(m[static_cast<size_t>(i)].role)) return i;
  return -1;
}
}  // namespace

std::vector<ChatSegment> render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& opts,
                                     const ChatTokens& tk) {
  const bool thinking = opts.thinking == ThinkingMode::kThinking;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    DSV4_CHECK(r == "system" || r == "user" || r == "developer" || r == "assistant",
               "message {}: role {:?} is not supported (system, user, developer, assistant; tool calls are not "
               "supported yet)", i, r);
  }
  // drop_thinking in thinking mode: developer messages before the last user message disappear and earlier
  // assistant turns lose their reasoning (the reference's _drop_thinking_messages).
  std::vector<ChatMessage> msgs;
  int last_user = last_user_index(messages);
  if (thinking && opts.drop_thinking) {
    for (int i = 0; i < static_cast<int>(messages.size()); ++i) {
      const ChatMessage& m = messages[static_cast<size_t>(i)];
      if (m.role == "developer" && i < last_user) continue;
      msgs.push_back(m);
      if (m.role == "assistant" && i < last_user) msgs.back().reasoning_content.clear();
    }
    last_user = last_user_index(msgs);
  } else {
    msgs = messages;
  }

  std::vector<ChatSegment> segs;
  if (opts.add_bos) segs.push_back({tk.bos, -1});
  int turn = 0;
  for (int i = 0; i < static_cast<int>(msgs.size()); ++i) {
    const ChatMessage& m = msgs[static_cast<size_t>(i)];
    if (m.role == "system") {
      segs.push_back({m.content, -1});
    } else if (is_user_like(m.role)) {
      segs.push_back({tk.user + m.content, -1});
    } else {  // assistant
      std::string text;
      if (thinking && (!opts.drop_thinking || i > last_user)) text = m.reasoning_content + tk.think_end;
      text += m.content + tk.eos;
      segs.push_back({std::move(text), turn++});
    }
    // The transition to the assistant follows a user turn that ends the conversation or precedes an assistant.
    const bool next_is_assistant = i + 1 < static_cast<int>(msgs.size()) && msgs[static_cast<size_t>(i) + 1].role == "assistant";
    if (i + 1 < static_cast<int>(msgs.size()) && !next_is_assistant) continue;
    if (is_user_like(m.role)) {
      const bool open_think = thinking && (!opts.drop_thinking || i >= last_user);
      segs.push_back({tk.assistant + (open_think ? tk.think_begin : tk.think_end), -1});
    }
  }
  return segs;
}

std::string render_chat_text(const std::vector<ChatMessage>& messages, const ChatOptions& opts, const ChatTokens& tk) {
  std::string s;
  for (const ChatSegment& seg : render_chat(messages, opts, tk)) s += seg.text;
  return s;
}

EncodedChat encode_chat(const Tokenizer& tok, const std::vector<ChatMessage>& messages, const ChatOptions& opts,
                        const ChatTokens& tk) {
  for (const std::string* t : {&tk.bos, &tk.eos, &tk.user, &tk.assistant, &tk.think_begin, &tk.think_end})
    DSV4_CHECK(tok.token_to_id(*t).has_value(), "tokenizer {} has no token {:?} needed by the V4 chat format",
               tok.source(), *t);
  const std::vector<ChatSegment> segs = render_chat(messages, opts, tk);
  int n_turns = 0;
  for (const ChatSegment& s : segs) n_turns = std::max(n_turns, s.assistant_turn + 1);
  std::string text;
  std::vector<std::pair<size_t, size_t>> trainable;  // byte spans
  for (const ChatSegment& s : segs) {
    const bool train = opts.mask == LossMaskPolicy::kAll ||
                       (opts.mask == LossMaskPolicy::kAssistant && s.assistant_turn >= 0) ||
                       (opts.mask == LossMaskPolicy::kLastAssistant && s.assistant_turn >= 0 &&
                        s.assistant_turn == n_turns - 1);
    if (train) trainable.emplace_back(text.size(), text.size() + s.text.size());
    text += s.text;
  }
  const Encoding e = tok.encode_with_offsets(text);
  EncodedChat out;
  out.ids = e.ids;
  out.loss_mask.resize(e.ids.size(), 0);
  size_t k = 0;  // spans and offsets are both increasing
  for (size_t t = 0; t < e.ids.size(); ++t) {
    const size_t start = e.offsets[t].first;
    while (k < trainable.size() && trainable[k].second <= start) ++k;
    out.loss_mask[t] = k < trainable.size() && trainable[k].first <= start;
  }
  return out;
}

ThinkingMode parse_thinking_mode(const std::string& s) {
  if (s == "chat") return ThinkingMode::kChat;
  if (s == "thinking") return ThinkingMode::kThinking;
  DSV4_FAIL("thinking mode {:?} is not one of chat, thinking", s);
}

LossMaskPolicy parse_mask_policy(const std::string& s) {
  if (s == "assistant") return LossMaskPolicy::kAssistant;
  if (s == "last") return LossMaskPolicy::kLastAssistant;
  if (s == "all") return LossMaskPolicy::kAll;
  DSV4_FAIL("loss-mask policy {:?} is not one of assistant, last, all", s);
}

}  // namespace dsv4::data
