// The submit form, generated from the API's own job schema (the request body of POST /v1/jobs in
// /openapi.json): a new job parameter appears here by itself, with its help, default and bounds.
// Only the fields the user set are sent: the service fills in its defaults for the others.

import { h } from "./dom.js";

const SKIPPED = new Set(["webhook"]); // objects the form does not edit (metadata is KEY=VALUE lines)

export async function jobSchema() {
  const document = await (await fetch(new URL("../openapi.json", location.href))).json();
  const body = document.paths["/v1/jobs"].post.requestBody.content["application/json"].schema;
  const resolve = (schema) => (schema.$ref ? document.components.schemas[schema.$ref.split("/").pop()] : schema);
  const schema = resolve(body);
  return { properties: schema.properties, required: new Set(schema.required || []) };
}

// The schema of a value without its `null` alternative (an Optional field).
function plain(schema) {
  if (!schema.anyOf) return schema;
  const kept = schema.anyOf.filter((option) => option.type !== "null");
  return kept.length === 1 ? { ...kept[0], description: schema.description, default: schema.default } : schema;
}

function labelOf(name, schema) {
  return schema.title || name.replace(/_/g, " ");
}

// One field: { name, element (to insert), read() -> [set?, value] }.
export function field(name, property, required) {
  const schema = plain(property);
  const id = `field-${name}`;
  const help = property.description || schema.description || "";
  const hint = help ? h("small", { id: `${id}-help`, class: "hint" }, help) : null;
  const describedBy = hint ? { "aria-describedby": `${id}-help` } : {};
  let input;
  let read;
  if (name === "metadata") {
    input = h("textarea", { id, name, rows: 2, placeholder: "team=vision\nticket=123", ...describedBy });
    read = () => {
      const pairs = input.value.split("\n").map((line) => line.trim()).filter(Boolean);
      if (!pairs.length) return [false];
      return [true, Object.fromEntries(pairs.map((pair) => [pair.split("=")[0], pair.split("=").slice(1).join("=")]))];
    };
  } else if (schema.type === "boolean") {
    input = h("input", { id, name, type: "checkbox", ...describedBy });
    input.checked = Boolean(schema.default);
    read = () => [input.checked !== Boolean(schema.default), input.checked];
  } else if (schema.enum) {
    input = h("select", { id, name, ...describedBy }, schema.enum.map((value) => h("option", { value }, value)));
    input.value = schema.default ?? schema.enum[0];
    read = () => [input.value !== schema.default, input.value];
  } else if (schema.type === "array" && schema.items && schema.items.enum) {
    const boxes = schema.items.enum.map((value) => h("input", { type: "checkbox", name, value, id: `${id}-${value}` }));
    input = h("fieldset", { id, class: "choices", ...describedBy },
      h("legend", {}, labelOf(name, property)),
      boxes.map((box) => h("label", { for: box.id }, box, ` ${box.value}`)));
    read = () => {
      const chosen = boxes.filter((box) => box.checked).map((box) => box.value);
      return [chosen.length > 0, chosen];
    };
    return { name, element: h("div", { class: "field" }, input, hint), read, focus: () => boxes[0].focus() };
  } else if (schema.type === "integer" || schema.type === "number") {
    const bounds = {};
    if (schema.minimum !== undefined) bounds.min = schema.minimum;
    if (schema.maximum !== undefined) bounds.max = schema.maximum;
    input = h("input", {
      id, name, type: "number", step: schema.type === "integer" ? "1" : "any", inputmode: "decimal",
      placeholder: schema.default !== undefined && schema.default !== null ? String(schema.default) : "service default",
      ...bounds, ...describedBy,
    });
    read = () => (input.value === "" ? [false] : [true, Number(input.value)]);
  } else if (schema.type === "string") {
    input = h("input", { id, name, type: "text", maxlength: schema.maxLength || 4096, autocomplete: "off",
      spellcheck: "false", ...describedBy });
    if (required) input.required = true;
    read = () => (input.value.trim() === "" ? [false] : [true, input.value.trim()]);
  } else {
    return null; // a kind of value this form does not know: the API takes it, the form leaves it out
  }
  const label = h("label", { for: id }, labelOf(name, property), required ? h("span", { class: "required" }, " (required)") : "");
  return { name, element: h("div", { class: "field" }, label, input, hint), read, input, focus: () => input.focus() };
}

export function fieldsOf({ properties, required }) {
  return Object.entries(properties)
    .filter(([name]) => !SKIPPED.has(name))
    .map(([name, property]) => field(name, property, required.has(name)))
    .filter(Boolean);
}
