; Python definitions and imports, in aider's capture scheme (name.definition.<kind>).
; Nesting (qualnames, method vs function, defs inside defs) is resolved in extract.py
; from byte ranges, so these patterns match every definition at any depth.

(class_definition
  name: (identifier) @name.definition.class) @definition.class

(function_definition
  name: (identifier) @name.definition.function) @definition.function

(import_statement) @reference.import
(import_from_statement) @reference.import
(future_import_statement) @reference.import
