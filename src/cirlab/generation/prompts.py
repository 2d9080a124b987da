"""Prompts of the training-free generative methods, and how each answer is parsed: configuration kept apart.

A method's config names a prompt here (``cirevl-structural``, ``ldre``, ``osrcir``, ...) or gives a template of its
own. Placeholders are ``{caption}`` (a reference-image caption) and ``{text}`` (the modification text); they are
substituted literally (no ``str.format``), so the JSON braces of the OSrCIR prompt stay as they are.

Where they follow:

- ``cirevl-*``: CIReVL (Karthik et al., ICLR 2024), ``src/prompts.py`` of ExplainableML/Vision_by_Language
  (Copyright (c) 2024 EML Tübingen, MIT License), reproduced exactly because the model's answers depend on every
  character. ``cirevl-blip`` is its captioning prompt; the rewriting prompts are sent as one user message, the base
  prompt followed by ``"\\nImage Content: <caption>\\nInstruction: <text>"`` (its ``generate_predictions``). Its
  example runs use ``contextual`` on CIRR, ``structural`` on CIRCO and ``fashion`` on FashionIQ; ``simple`` is its
  default.
- ``ldre``: LDRE (Yang et al., SIGIR 2024), the system and user messages of ``src/reasoning_and_editing.py`` of
  yzy-bupt/LDRE (one worked example, then the caption and the instruction), reproduced exactly.
- ``osrcir``: OSrCIR (Tang et al., CVPR 2025), the system prompt ``mllm_structural_predictor_prompt_CoT`` of
  ``src/prompts.py`` of Pter61/osrcir (MIT License per its README) and the user message of its ``src/utils.py``
  (the input block with the manipulation text; the image follows the text), reproduced exactly.
- ``shapes-*``: the Shapes world's stand-in models (``cirlab.training.generators``) were trained with these short
  prompts; the Shapes presets of the three methods select them.

Parsers (``Prompt.parse``) turn a raw answer into a target description; every one falls back to the modification
text when the answer holds none, as the references do:

- ``plain``: the answer's first non-empty line.
- ``cirevl``: the first line starting with ``Edited Description:``, cut as the reference cuts it (the text between
  the first and the second colon).
- ``ldre``: the answer with a leading ``Edited Description:`` removed, first non-empty line (the reference keeps the
  whole answer; its GPT-3.5 answers are one line, as the prompt asks).
- ``osrcir``: ``<Response>`` tags and a ```` ```json ```` fence removed, the ``Target Image Description`` of the JSON
  object. The reference parses the whole answer as JSON; local models often add text around the object, so the
  outermost ``{...}`` is parsed when the whole answer is not JSON (the one departure).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cirlab.generation.sampling import Request
from cirlab.types import ReferenceImage

PARSERS = ("plain", "cirevl", "ldre", "osrcir")


@dataclass(frozen=True)
class Prompt:
    """A prompt template and the parser of its answers.

    Attributes:
        user: the user message; ``{caption}`` and ``{text}`` are substituted.
        system: the system message ("" for none).
        image_position: where the image goes in the user message (image prompts): ``before`` or ``after``.
        parse: the answer parser (one of ``PARSERS``).
    """

    user: str
    system: str = ""
    image_position: str = "before"
    parse: str = "plain"

    def __post_init__(self) -> None:
        if self.parse not in PARSERS:
            raise ValueError(f"unknown parser {self.parse!r}; known: {', '.join(PARSERS)}")

    def request(self, caption: str = "", text: str = "", image: ReferenceImage | None = None) -> Request:
        """The request for one input: placeholders substituted, the image attached."""
        user = self.user.replace("{caption}", caption).replace("{text}", text)
        return Request(user=user, system=self.system, image=image, image_position=self.image_position)

    def answer(self, raw: str, fallback: str) -> str:
        """The target description in a raw answer (``fallback`` when it holds none)."""
        return parse_answer(raw, self.parse, fallback)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _osrcir(raw: str) -> str:
    text = raw.strip()
    if text.startswith("<Response>"):
        text = text.replace("<Response>", "").replace("</Response>", "").strip()
    if text.startswith("```json"):
        text = text.replace("```json", "").replace("```", "").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        try:
            obj = json.loads(text[start : end + 1]) if 0 <= start < end else None
        except json.JSONDecodeError:
            obj = None
    value = obj.get("Target Image Description", "") if isinstance(obj, dict) else ""
    return value.strip() if isinstance(value, str) else ""


def parse_answer(raw: str, parser: str, fallback: str) -> str:
    """The target description in ``raw`` according to ``parser`` (see the module docstring); ``fallback`` when
    there is none."""
    if parser == "plain":
        found = _first_line(raw)
    elif parser == "cirevl":
        line = next((x for x in raw.split("\n") if x.strip().startswith("Edited Description:")), "")
        found = line.split(":")[1].strip() if line else ""
    elif parser == "ldre":
        found = _first_line(re.sub(r"^\s*Edited Description:", "", raw.strip()))
    elif parser == "osrcir":
        found = _osrcir(raw)
    else:
        raise ValueError(f"unknown parser {parser!r}; known: {', '.join(PARSERS)}")
    return found or fallback


CIREVL_BLIP = "Describe the image in complete detail. You must especially focus on all the objects in the image"


CIREVL_SIMPLE = (
    "\n"
    "I have an image. Given an instruction to edit the image, carefully generate a description of the \n"
    "edited image. I will put my image content beginning with “Image Content:”. The instruction I provide will "
    'begin with “Instruction:". \n'
    'The edited description you generate should begin with “Edited Description:". The edited description you '
    "generate  should be complete and can cover various semantic aspects, \n"
    "including cardinality, addition, negation, direct addressing, compare & change, comparative, conjunction, "
    "spatial relations & background, viewpoint. \n"
    "The edited description needs to be as simple as possible. The instruction does not need to explicitly "
    "indicate which\n"
    "type it is. Avoid adding imaginary things. Each time generate one instruction and one edited description "
    "only. Keep the edited description as short as possible"
)


CIREVL_CONTEXTUAL = (
    "\n"
    "I have an image. Given an instruction to edit the image, carefully generate a description of the \n"
    "edited image. I will put my image content beginning with “Image Content:”. The instruction I provide will "
    'begin with “Instruction:". \n'
    'The edited description you generate should begin with “Edited Description:". The caption you generate '
    "should only talk about the modified image and not the original image. \n"
    "Keep the caption as short as possible. Avoid adding imaginary things. Use the examples below for reference.\n"
    "\n"
    "Image Content: the men are holding a large fish on a stick\n"
    "Instruction: People watch behind the fences of animals in the center.\n"
    "Edited Description: people, a bull, a crowd, a fence, a ring, a bull, a ring, a\n"
    "\n"
    "Image Content: a man in a blue robe is adjusting a man in a blue robe\n"
    "Instruction: Change the gowns to black with a navy blue collar\n"
    "Edited Description: a woman in a cap and gown is standing in front of a group of people\n"
    "\n"
    "Image Content: people, sled dogs, snow, sled, sled dogs, sled, sled dogs, sled\n"
    "Instruction: Dog led sled moves in front of another person behind it in the snow.\n"
    "Edited Description: a man is pulling a sled full of huskies down a snowy trail\n"
    "\n"
    "Image Content: the penguin, the snow, the penguin, the snow, the penguin, the penguin, the penguin, the "
    "penguin,\n"
    "Instruction: The Target Image shows a single penguin standing on the ice with a fish in its beak.\n"
    "Edited Description: the penguin is holding a fish in its beak\n"
    "\n"
    "Image Content: the panda bear is sitting in the grass eating bamboo\n"
    "Instruction: Replace the panda with a group of dogs and replace the walls with wooden fences.\n"
    "Edited Description: Three dogs are laying down on a deck\n"
    "\n"
    "Image Content: The dog is playing with a dachshund on the beach\n"
    "Instruction: Remove the small dog and have the large dog face the opposite direction.\n"
    "Edited Description: The dog is standing in the sand on a beach\n"
    "\n"
    "Image Content: there is a bottle of pepsi cola sitting on a table\n"
    "Instruction: show three bottles of soft drink\n"
    "Edited Description: Three bottles of soft drink sitting on a table.\n"
    "\n"
    "Image Content: a group of people posing for a photo in a lab\n"
    "Instruction: reduce the number of people to four, make them stand outside on grass\n"
    "Edited Description: Four people posing for a photo standing on grass.\n"
    "\n"
    "Image Content: There is a herd of antelopes on a dirt road\n"
    "Instruction: The target photo has one antelope in a wooded area looking back at the camera.\n"
    "Edited Description: One antelope in a wooded area looking back at the camera.\n"
    "\n"
    "Image Content: There is a bakery with a counter full of baked goods\n"
    "Instruction: The target photo is of a sticker display in a store.\n"
    "Edited Description: A sticker display in a store.\n"
    "\n"
    "Image Content: The doctor is holding up a syringe\n"
    "Instruction: Change to a close-up photograph of a female nurse and a real syringe, must be looking directly "
    "towards camera\n"
    "Edited Description: A close-up of a female nurse holding a syringe, looking directly towards the camera.\n"
    "\n"
    "Image Content: Two dogs are sitting in the back of a truck\n"
    "Instruction: Push the brown dog on the blue float in the pool.\n"
    "Edited Description: The brown dog is on a blue float in the pool.\n"
    "\n"
    "Image Content: The baboon is sitting in a tree\n"
    "Instruction: make monkey stand on top of a bucket\n"
    "Edited Description: The baboon is standing on top of a bucket.\n"
    "\n"
    "Image Content: three people are swimming with sting rays\n"
    "Instruction: Unlike the Reference Image, I want the Target Image to show a single person snorkeling and "
    "holding a sea turtle\n"
    "Edited Description: A single person snorkeling and holding a sea turtle.\n"
    "\n"
    "Image Content: There is a plate with lemons, onions, and fish on it\n"
    "Instruction: change shrimps to bowls of fruits\n"
    "Edited Description: There is a plate with lemons, onions, and bowls of fruits on it.\n"
    "\n"
    "Image Content: There is a glass bowl filled with a brown mixture on a wooden table\n"
    "Instruction: The target photo shows the rising of a ball of dough at the top of the same white bowl\n"
    "Edited Description: A ball of dough rising at the top of a white bowl on a wooden table.\n"
    "\n"
    "Image Content: There is a silver water bottle on a black background\n"
    "Instruction: Remove thermal bottle, Add pump-style bottle (goldtone pump, white cylindrical bottle with "
    "marble finish), Change to light background\n"
    "Edited Description: A pump-style bottle with a goldtone pump and a white cylindrical bottle with a marble "
    "finish on a light background.\n"
    "\n"
    "Image Content: There is a bottle of beer next to a glass of beer\n"
    "Instruction: Put the opened green bottle in front of woman on the phone. \n"
    "Edited Description: An opened green bottle of beer in front of a woman on the phone.\n"
    "\n"
    "Image Content: a group of boys are posing on a bed with pillows\n"
    "Instruction: Change to a bigger pile of pillows, cushions with variant colours, no people in view\n"
    "Edited Description: A bigger pile of pillows and cushions with variant colors, no people in view.\n"
    "\n"
    "Image Content: There is a black and brown puppy sitting next to a teddy bear\n"
    "Instruction: Add an owner with the dog on its leash\n"
    "Edited Description: A black and brown puppy on a leash next to its owner and a teddy bear.\n"
    "\n"
    "Image Content: a pug dog is running in a grassy field\n"
    "Instruction: Add a human wearing a pug mask\n"
    "Edited Description: A pug dog and a human wearing a pug mask are running in a grassy field.\n"
    "\n"
    "Image Content: the dog is wearing a mustache and a bowtie\n"
    "Instruction: Have two different dogs on the ground facing left but one standing on its hind legs.\n"
    "Edited Description: Two different dogs on the ground facing left, one standing on its hind legs, both "
    "wearing a mustache and a bowtie.\n"
    "\n"
    "Image Content: The image shows a group of pins on a piece of paper\n"
    "Instruction: Add spheres to the end of the safety pins\n"
    "Edited Description: A group of pins with spheres on the ends on a piece of paper.\n"
    "\n"
    "Image Content: the gorilla is eating a banana from a bag\n"
    "Instruction: Facing the other direction, closer photo\n"
    "Edited Description: A closer photo of the gorilla facing the opposite direction, eating a banana from a "
    "bag.\n"
)


# The opening and the first six aspect examples are the same in CIReVL's general and fashion prompts.
_CIREVL_HEAD = (
    "\n"
    "I have an image. Given an instruction to edit the image, carefully generate a description of the \n"
    "edited image. I will put my image content beginning with “Image Content:”. The instruction I provide will "
    'begin with “Instruction:". \n'
    'The edited description you generate should begin with “Edited Description:". The edited description you '
    "generate should be complete and can cover various semantic aspects, such as \n"
    "cardinality, addition, negation, direct addressing, compare & change, comparative, conjunction, spatial "
    "relations & background, viewpoint. Use the examples below as reference for these aspects:\n"
    "\n"
    '"cardinality"\n'
    "Image Content: A bee is flying around a flower on a field.\n"
    "Instruction: Duplicate the flower the bee is flying around.\n"
    "Edited Description: A bee is flying around two flowers on a field.\n"
    "\n"
    '"addition"\n'
    "Image Content: A dog is walking in a grassy field.\n"
    "Instruction: Add a butterfly to the scene.\n"
    "Edited Description: A dog is walking next to a butterfly in a grassy field.\n"
    "\n"
    '"negation"\n'
    "Image Content: A plane flying in the cloudy sky.\n"
    "Instruction: Remove the clouds from the sky.\n"
    "Edited Description: A plane flying in the clear sky.\n"
    "\n"
    '"direct addressing"\n'
    "Image Content: The eiffel tower on a summer day.\n"
    "Instruction: Highlight the eiffel tower with a red circle.\n"
    "Edited Description: The eiffel tower, highlighted with a red circle, on a summer day.\n"
    "\n"
    '"compare & change"\n'
    "Image Content: The panda bear is sitting in the grass eating bamboo\n"
    "Instruction: Replace the panda with a group of dogs and replace the bamboo with bones.\n"
    "Edited Description: Three dogs are laying in the grass munching on some bones.\n"
    "\n"
    '"comparative"\n'
)


CIREVL_STRUCTURAL = _CIREVL_HEAD + (
    "Image Content: A picture of the sun and the moon.\n"
    "Instruction: Make the sun brighter than the moon.\n"
    "Edited Description: A picture of the sun shining much brighter than the moon.\n"
    "\n"
    '"conjunction"\n'
    "Image Content: Several children are playing on the ground.\n"
    "Instruction: Add both a cat and a dog to the image.\n"
    "Edited Description: Several children are playing with a cat and a dog.\n"
    "\n"
    '"spatial relations & background"\n'
    "Image Content: A man standing on a sled pulled by several sled dogs, next to a small wooden house.\n"
    "Instruction: Place the house behind the man, and make it much larger.\n"
    "Edited Description: A man standing on a sled pulled by several sled dogs, in front of a large wooden house.\n"
    "\n"
    '"viewpoint"\n'
    "Image Content: A picture of a salad bowl.\n"
    "Instruction: Change the perspective to a bird's-eye view.\n"
    "Edited Description: A salad bowl viewed from above. \n"
    " \n"
    "\n"
    "The edited description needs to be as simple as possible. The instruction does not need to explicitly "
    "indicate which\n"
    "type it is. Avoid adding imaginary things. Each time generate one instruction and one edited description "
    "only. Keep the edited description as short as possible. Here are some more examples for reference:\n"
    "\n"
    "Image Content: the men are holding a large fish on a stick\n"
    "Instruction: People watch behind the fences of animals in the center.\n"
    "Edited Description: people, a bull, a crowd, a fence, a ring, a bull, a ring, a\n"
    "\n"
    "Image Content: a man in a blue robe is adjusting a man in a blue robe\n"
    "Instruction: Change the gowns to black with a navy blue collar\n"
    "Edited Description: a woman in a cap and gown is standing in front of a group of people\n"
    "\n"
    "Image Content: people, sled dogs, snow, sled, sled dogs, sled, sled dogs, sled\n"
    "Instruction: Dog led sled moves in front of another person behind it in the snow.\n"
    "Edited Description: a man is pulling a sled full of huskies down a snowy trail\n"
    "\n"
    "Image Content: the legend of zelda ocarina of time t-shirt\n"
    "Instruction: is green and a graphic on it and is green\n"
    "Edited Description: the shirt is green with an image of link holding a sword\n"
    "\n"
    "Image Content: i'm glad you're alive\n"
    "Instruction: is darker and less wordy and is darker\n"
    "Edited Description: the shirt is burgundy with a pug face on it\n"
    "\n"
    "Image Content: the penguin, the snow, the penguin, the snow, the penguin, the penguin, the penguin, the "
    "penguin,\n"
    "Instruction: The Target Image shows a single penguin standing on the ice with a fish in its beak.\n"
    "Edited Description: the penguin is holding a fish in its beak\n"
    "\n"
    "Image Content: the panda bear is sitting in the grass eating bamboo\n"
    "Instruction: Replace the panda with a group of dogs and replace the walls with wooden fences.\n"
    "Edited Description: Three dogs are laying down on a deck\n"
    "\n"
    "Image Content: The dog is playing with a dachshund on the beach\n"
    "Instruction: Remove the small dog and have the large dog face the opposite direction.\n"
    "Edited Description: The dog is standing in the sand on a beach\n"
    "\n"
    "Image Content: the dress is a silver sequined one shoulder dress\n"
    "Instruction: is lighter colored and less fitted and is a light pink color\n"
    "Edited Description: the dress is a one shoulder chiffon dress with a ruffled skirt\n"
    "\n"
    "Image Content: black and yellow hawaiian floral print sleeveless hawaiian hawaiian \n"
    "Instruction: Sexier and no vibrant colors and less revealing chest and more evening wear\n"
    "Edited Description: the dress is a black and green dress with a sleeveless bodice and a flared skirt\n"
)


CIREVL_FASHION = _CIREVL_HEAD + (
    "Image Content: the man is wearing a red t - shirt\n"
    "Instruction: is solid white and is a ligher color\n"
    "Edited Description: the man is wearing a solid,  light-white t-shirt.\n"
    "\n"
    '"conjunction"\n'
    "Image Content: Several children are playing on the ground.\n"
    "Instruction: Add both a cat and a dog to the image.\n"
    "Edited Description: Several children are playing with a cat and a dog.\n"
    "\n"
    '"spatial relations & background"\n'
    "Image Content: A man standing on a sled pulled by several sled dogs, next to a small wooden house.\n"
    "Instruction: Place the house behind the man, and make it much larger.\n"
    "Edited Description: A man standing on a sled pulled by several sled dogs, in front of a large wooden house.\n"
    "\n"
    '"viewpoint"\n'
    "Image Content: A picture of a salad bowl.\n"
    "Instruction: Change the perspective to a bird's-eye view.\n"
    "Edited Description: A salad bowl viewed from above. \n"
    " \n"
    "The edited description needs to be as simple as possible. The instruction does not need to explicitly "
    "indicate which\n"
    "type it is. Avoid adding imaginary things. Each time generate one instruction and one edited description "
    "only. Keep the edited description as short as possible. Here are some more examples for reference:\n"
    "\n"
    "Image Content: the man is wearing a white tank top and black shorts\n"
    "Instruction: looks faded and cheaper and is longer\n"
    "Edited Description: The man is wearing a faded, cheap-looking and elongated white tank top, giving a "
    "worn-out slightly oversized and more casual appearance.\n"
    "\n"
    "Image Content: the only winning move is not to play t shirt\n"
    "Instruction: The shirt is black with a skeleton and is red\n"
    'Edited Description: The image shows a black t-shirt with a red skeleton design on it. Is says "the only '
    'winning move is not to play".\n'
    "\n"
    "Image Content: the man is wearing a black polo shirt\n"
    "Instruction: is less formal with less buttons and is gray with no collar\n"
    "Edited Description: The man is wearing a less formal, gray polo shirt with no collar and fewer buttions, "
    "giving it a more casual and relaxed appearance.\n"
    "\n"
    "Image Content: the legend of zelda ocarina of time t-shirt\n"
    "Instruction: is green and a graphic on it and is green\n"
    "Edited Description: the shirt is green with an image of link holding a sword\n"
    "\n"
    "Image Content: The woman is wearing a tan shirt and jeans\n"
    "Instruction: is the same and appears to be exactly the same\n"
    "Edited Description: The woman is wearing a tan shirt and jeans\n"
    "\n"
    "Image Content: The woman is wearing a green top with hearts on it\n"
    "Instruction: is pinched more below the bust and is brown in color\n"
    "Edited Description: The woman is wearing a brown top with hearts on it, which is pinched more below the "
    "bust.\n"
    "\n"
    "Image Content: the woman is wearing a yellow tank top\n"
    "Instruction: is very similar but deeper red and is red\n"
    "Edited Description: The woman is wearing a deep red tank top.\n"
    "\n"
    "Image Content: the woman is wearing a polka dot dress\n"
    "Instruction: has thinner straps and is darker\n"
    "Edited Description: The woman is wearing a darker polka dot dress with thin straps, giving it a more "
    "delicate, elegant look.\n"
    "\n"
    "Image Content: the dress is a silver sequined one shoulder dress\n"
    "Instruction: is lighter colored and less fitted and is a light pink color\n"
    "Edited Description: the dress is a one shoulder chiffon dress with a ruffled skirt\n"
    "\n"
    "Image Content: black and yellow hawaiian floral print sleeveless hawaiian hawaiian \n"
    "Instruction: Sexier and no vibrant colors and less revealing chest and more evening wear\n"
    "Edited Description: the dress is a black and green dress with a sleeveless bodice and a flared skirt\n"
)


LDRE_SYSTEM = (
    "I have an image. Given an instruction to edit the image, carefully generate a description of the edited image."
)


LDRE_USER = (
    'I will put my image content beginning with "Image Content:". The instruction I provide will begin with '
    '"Instruction:". The edited description you generate should begin with "Edited Description:". You just '
    'generate one edited description only begin with "Edited Description:". The edited description needs to be '
    "as simple as possible and only reflects image content. Just one line.\n"
    "A example:\n"
    "Image Content: a man adjusting a woman's tie.\n"
    "Instruction: has the woman and the man with the roles switched.\n"
    "Edited Description: a woman adjusting a man's tie.\n"
    "\n"
    "Image Content: {caption}\n"
    "Instruction: {text}\n"
    "Edited Description:"
)


OSRCIR_SYSTEM = (
    "\n"
    "- You are an image description expert. You are given an original image and manipulation text.\n"
    "- Your goal is to generate a target image description that reflects the changes described based on "
    "manipulation intents while retaining as much image content from the original image as possible.\n"
    "- You should carefully generate an image description of the target image with a thought of your "
    "understanding of the manipulation intents.\n"
    "\n"
    "## Guidelines on generating the Original Image Description\n"
    "\n"
    "    - Ensure that the original image description is thorough and detailed, capturing all visible objects, "
    "attributes, and elements. Specific attention should be given to any objects breeds, relationships, color, "
    "scenes, and the overarching domain of the image to provide a complete understanding.\n"
    "    - The original image description should be as accurate as possible, reflecting the content and context "
    "of the image. \n"
    "\n"
    "## Guidelines on generating the Thoughts\n"
    "    - In your Thoughts, explain your understanding of the manipulation intents and how you formulated the "
    "target image description.\n"
    "    - Provide insight into how you interpreted the manipulation intent detailed in the manipulation text, "
    "considering various semantic aspects.\n"
    "    - Conclude with how these understandings were utilized to formulate the target image description, "
    "ensuring a logical and visually coherent transformation.\n"
    "\n"
    "    ### Guidelines on generating the Reflections\n"
    "    - In your Reflections, summarize how the manipulation intent influenced your approach to transforming "
    "the original image description.\n"
    "    - Explain how the changes made reflect the specific semantic aspects involved, such as addition, "
    "negation, spatial relations, or viewpoint.\n"
    "    - Highlight key decisions that were made to preserve the coherence and context of the original image "
    "while meeting the manipulation intent.\n"
    "    - Reflect on the impact these changes have on the overall appearance or narrative of the image.\n"
    "    - Ensure that your reflections provide a concise yet insightful summary of the considerations and "
    "strategies applied in crafting the target image description, offering a logical connection between the "
    "original content and the final description.\n"
    "\n"
    "## Guidelines on generating Target Image Description\n"
    "    - The target image description you generate should be complete and can cover various semantic aspects, "
    "such as cardinality, addition, negation, direct addressing, compare & change, comparative, conjunction, "
    "spatial relations & background, viewpoint. Use the examples below as reference for these aspects:\n"
    "    - The target image description only contain the target image content and needs to be as simple as "
    "possible. The instruction does not need to explicitly indicate which type it is. Minimize aesthetic "
    "descriptions as much as possible. Each time generate one target image description only. Keep the target "
    "image description as short as possible. Here are some more examples for reference:\n"
    "\n"
    "## On the input format <Input>\n"
    "- Input consist of two parts: The original image and the manipulation text.\n"
    "{\n"
    '    "Original Image": <image_url>,\n'
    '    "Manipulation text": <manipulation_text>.\n'
    "}\n"
    "    - The original image is a URL provided in the image_url field of the user content data type, which "
    "furnishes the content of the original image.\n"
    "    - The manipulation text is the text that describes the changes to be made to the original image.\n"
    "\n"
    "## Guidelines on determining the response <Response>\n"
    "- Responses consist of Three parts: the Original Image Context, the Target Image Description, and Thoughts.\n"
    "{\n"
    '    "Original Image Description": <original_image_description>,\n'
    '    "Thoughts": <thoughts>,\n'
    '    "Reflections": <reflections>,\n'
    '    "Target Image Description": <target_image_description>\n'
    "}\n"
    "\n"
    "Here are some more examples for reference:\n"
    "\n"
    "## Example 1\n"
    "<Input>\n"
    "{\n"
    '    "Original Image": <image_url>,\n'
    '    "Manipulation text": "Shows a dog of the same breed with darker brown fur laying in the grass with a '
    'woven basket of flowers."\n'
    "}\n"
    "<Response>\n"
    "{\n"
    '    "Original Image Description": "The image shows a man in a green field with a dog of Hungarian Vizsla '
    "breed. The man, wearing a dark green jacket and cap, is standing while the dog is pointing, indicating a "
    "hunting or tracking activity. The background is a grassy field extending to the horizon with trees faintly "
    "visible in the distance. The atmosphere appears calm, with an overcast sky providing soft lighting for the "
    'scene.",\n'
    '    "Thoughts": "The manipulation intent is to change the scene by introducing a dog of Hungarian Vizsla '
    "breed but with darker brown fur, and to have it laying in the grass with a woven basket of flowers. This "
    "involves altering the dog's position and color, as well as adding a new element, the basket of flowers, to "
    'the scene.",\n'
    '    "Reflections": "I reflect that the manipulation focuses on changing the dog\'s appearance and activity '
    "while adding a new object to the scene, which shifts the focus from the interaction between the person and "
    'the dog to a more serene and decorative setting.",\n'
    '    "Target Image Description": "A Hungarian Vizsla dog with darker brown fur is laying in the grass next '
    'to a woven basket of flowers."\n'
    "}\n"
    "\n"
    "## Example 2\n"
    "<Input>\n"
    "{\n"
    '    "Original Image": <image_url>,\n'
    '    "Manipulation text": "Focus on a single bird with open wings and get closer"\n'
    "}\n"
    "<Response>\n"
    "{\n"
    '    "Original Image Description": "The image shows a group of black vultures perched on a metal structure. '
    "The birds are gathered closely together, with two of them touching beaks, forming a heart shape. Several "
    "birds have their wings folded, while one is displaying open wings. The background features a blurred "
    'landscape, suggesting an elevated or open area.",\n'
    '    "Thoughts": "The manipulation intent is to focus on a single bird with open wings and to get closer, '
    "which suggests a change in both the subject focus and the perspective. The original image features a group "
    "of vultures, but the manipulation requires isolating one bird, particularly one with open wings, and "
    "zooming in to provide a closer view. This would emphasize the details of the bird's wings and features, "
    'shifting the focus from the group to an individual bird.",\n'
    '    "Reflections": "I reflect that the manipulation intent involves changing the focus from a group to a '
    "single bird, enhancing the details and features of the bird by getting closer, which alters the narrative "
    'from a collective scene to an individual focus.",\n'
    '    "Target Image Description": "A single black vulture with open wings is shown up close."\n'
    "}\n"
    "\n"
    "## Example 3\n"
    "<Input>\n"
    "{   \n"
    '    "Original Image": <image_url>,\n'
    '    "Manipulation text": "Replace entire content with saloon spot with man and boy."\n'
    "}\n"
    "<Response>\n"
    "{\n"
    '    "Original Image Description": "The image features two miniature Schnauzer dogs standing on a mat near a '
    "glass door. One dog has a red collar, and they are positioned close to each other, facing in the same "
    "direction, with one appearing to sniff the other. The background includes a folding chair visible outside "
    "through the glass door, a curtain with decorative patterns, and part of an indoor cabinet with household "
    'items.",\n'
    '    "Thoughts": "The manipulation intent was to replace the original content featuring two dogs with an '
    "entirely different setting involving a barbershop where a man and a young boy are present. This includes "
    "changing the focus from pets to human characters, transforming the context into a typical barbershop scene. "
    "The new background features elements such as barber tools, a window with blinds, and a more human-oriented "
    "environment that provides a sense of familiarity and warmth. This manipulation significantly shifts the "
    "original focus and dynamics, changing both the subjects and the setting entirely to create a human-centered "
    'narrative.",\n'
    '    "Reflections": "I reflect that the manipulation intent involved creating an entirely different scene by '
    "introducing human subjects and a barbershop environment. This required me to focus on capturing the new "
    "setting details, including the interaction between the man and the boy, the objects they interact with, and "
    'the new atmosphere that evokes a sense of everyday life.",\n'
    '    "Target Image Description": "A man giving a young boy a haircut in a barbershop."\n'
    "}\n"
    "\n"
)


OSRCIR_USER = (
    "\n"
    "                <Input>\n"
    "                    {\n"
    '                        "Original Image": <image_url>\n'
    '                        "Manipulation text": {text}.\n'
    "                    }\n"
    "                "
)


CIREVL_REWRITE_TAIL = "\nImage Content: {caption}\nInstruction: {text}"

SHAPES_DESCRIBE = "describe the image:"
"""The Shapes captioner's prompt for the canonical caption (``cirlab.data.shapes.eval_caption``)."""
SHAPES_REWRITE = "Image Content: {caption}\nInstruction: {text}"
"""The Shapes rewriter's user message (CIReVL's layout without its instructions, which the stand-in never read)."""
SHAPES_ONE_STAGE = "Instruction: {text}\nTarget:"
"""The Shapes one-stage model's prompt: the modification text, then the target description."""

PROMPTS: dict[str, Prompt] = {
    "cirevl-blip": Prompt(user=CIREVL_BLIP),
    "cirevl-simple": Prompt(user=CIREVL_SIMPLE + CIREVL_REWRITE_TAIL, parse="cirevl"),
    "cirevl-contextual": Prompt(user=CIREVL_CONTEXTUAL + CIREVL_REWRITE_TAIL, parse="cirevl"),
    "cirevl-structural": Prompt(user=CIREVL_STRUCTURAL + CIREVL_REWRITE_TAIL, parse="cirevl"),
    "cirevl-fashion": Prompt(user=CIREVL_FASHION + CIREVL_REWRITE_TAIL, parse="cirevl"),
    "ldre": Prompt(user=LDRE_USER, system=LDRE_SYSTEM, parse="ldre"),
    "osrcir": Prompt(user=OSRCIR_USER, system=OSRCIR_SYSTEM, image_position="after", parse="osrcir"),
    "none": Prompt(user=""),
    "shapes-describe": Prompt(user=SHAPES_DESCRIBE),
    "shapes-rewrite": Prompt(user=SHAPES_REWRITE),
    "shapes-one-stage": Prompt(user=SHAPES_ONE_STAGE),
}


def resolve_prompt(value: str) -> Prompt:
    """The prompt named ``value`` in ``PROMPTS``, else ``value`` itself as a user template (parsed ``plain``)."""
    return PROMPTS.get(value) or Prompt(user=value)
