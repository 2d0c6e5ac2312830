// DeepSeek-V4 chat format and the assistant-only loss mask.
//
// Rendering follows DeepSeek's encoding/encoding_dsv4.py (released with DeepSeek-V4-Flash; public copies in
// supermy/ds4rs and sfxnz/DeepSeek-V4-Flash-Vision-Exp-vLLM-2x-DGX-Spark, encoding/encoding_dsv4.py):
//
//   <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>...
//
//   - chat mode: every user turn followed by an assistant turn (or ending the conversation) gets
//     "<｜Assistant｜></think>"; the assistant turn is "{content}<｜end▁of▁sentence｜>".
//   - thinking mode: the transition is "<｜Assistant｜><think>" and the assistant turn is
//     "{reasoning_content}</think>{content}<｜end▁of▁sentence｜>". With drop_thinking (the default), turns
//     before the last user message keep no reasoning ("<｜Assistant｜></think>{content}<eos>") and developer
//     messages before it are dropped, exactly like the reference.
//   - "developer" messages render like user messages; consecutive user messages get a single transition.
// Not supported (rejected with an error): tools / tool_calls / role "tool" (DSML tool-call blocks), the
// latest_reminder role, quick-instruction tasks, reasoning-effort prefixes.
//
// Loss mask: by default the tokens of every assistant turn (reasoning, "</think>", answer and the EOS) are
// trainable and everything else (BOS, system, user turns, "<｜Assistant｜>" and the "<think>"/"</think>" that
// the prompt side emits) is not. kLastAssistant trains only the final assistant turn; kAll trains everything.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv4::data {

class Tokenizer;

enum class ThinkingMode { kChat, kThinking };
enum class LossMaskPolicy { kAssistant, kLastAssistant, kAll };

struct ChatMessage {
  std::string role;  // system | user | developer | assistant
  std::string content;
  std::string reasoning_content;  // assistant only; used in thinking mode
};

struct ChatOptions {
  ThinkingMode thinking = ThinkingMode::kChat;
  bool drop_thinking = true;
  bool add_bos = true;
  LossMaskPolicy mask = LossMaskPolicy::kAssistant;
};

// The V4 special-token strings (override for a tokenizer that names them differently).
struct ChatTokens {
  std::string bos = "<｜begin▁of▁sentence｜>";
  std::string eos = "<｜end▁of▁sentence｜>";
  std::string user = "<｜User｜>";
  std::string assistant = "<｜Assistant｜>";
  std::string think_begin = "<think>";
  std::string think_end = "</think>";
};

struct ChatSegment {
  std::string text;
  int assistant_turn = -1;  // index among the rendered assistant turns, -1 for prompt text
};

// The conversation as text segments (concatenated they are the prompt string of encoding_dsv4.py).
// Throws dsv4::Error for an unknown role.
std::vector<ChatSegment> render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& opts,
                                     const ChatTokens& tokens = {});
std::string render_chat_text(const std::vector<ChatMessage>& messages, const ChatOptions& opts,
                             const ChatTokens& tokens = {});

struct EncodedChat {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss_mask;  // 1 = the token is a training target
};

// Tokenises the whole rendered string at once (so ids equal the reference's tokenisation of the prompt string)
// and marks each token by the segment its first byte comes from. Throws when the tokenizer lacks one of the
// special tokens the conversation needs (they would otherwise be split into ordinary pieces silently).
EncodedChat encode_chat(const Tokenizer& tok, const std::vector<ChatMessage>& messages, const ChatOptions& opts,
                        const ChatTokens& tokens = {});

ThinkingMode parse_thinking_mode(const std::string& s);   // "chat" | "thinking"
LossMaskPolicy parse_mask_policy(const std::string& s);   // "assistant" | "last" | "all"

}  // namespace dsv4::data
