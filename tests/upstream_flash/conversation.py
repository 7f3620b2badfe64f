"""Stub of upstream `conversation.py`: the `internvl2_5` template only (MPT style:
`<|im_start|>role\n...<|im_end|>\n`)."""


class Conversation:
    def __init__(self, system_message):
        self.system_message = system_message
        self.roles = ("<|im_start|>user\n", "<|im_start|>assistant\n")
        self.sep = "<|im_end|>\n"
        self.messages = []

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        ret = "<|im_start|>system\n" + self.system_message + self.sep
        for role, message in self.messages:
            ret += role + message + self.sep if message else role
        return ret


def get_conv_template(name):
    assert name == "internvl2_5", name
    return Conversation(SYSTEM)


SYSTEM = ("你是书生·万象，英文名是InternVL，"
          "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")
