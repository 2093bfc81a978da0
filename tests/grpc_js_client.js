// Run by tests/test_other_stacks.py with Node.js: the service as a client on another gRPC stack sees it
// (@grpc/grpc-js, protos loaded at run time by @grpc/proto-loader, no generated code). Prints one JSON object.
//
//   node tests/grpc_js_client.js HOST:PORT RAW_DIGIT_FILE PNG_FILE NUMBER_IMAGE
"use strict";
const path = require("path");
const fs = require("fs");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const root = path.resolve(__dirname, "..");
const options = {keepCase: true, longs: String, enums: String, defaults: true, oneofs: true};
const mnist = grpc.loadPackageDefinition(
  loader.loadSync(path.join(root, "proto/mnist/v1/classifier.proto"), {...options, includeDirs: [root]}),
).mnist.v1;
const inference = grpc.loadPackageDefinition(
  loader.loadSync("grpc_service.proto", {...options, includeDirs: [path.join(root, "proto/inference")]}),
).inference;

const [target, rawFile, pngFile, numberFile] = process.argv.slice(2);
const classifier = new mnist.Classifier(target, grpc.credentials.createInsecure());
const oip = new inference.GRPCInferenceService(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 20000);
const call = (client, method, request) =>
  new Promise((resolve) => {
    client[method](request, {deadline: deadline()}, (error, reply) =>
      resolve(error ? {error: {code: error.code, details: error.details}} : reply),
    );
  });

(async () => {
  const raw = fs.readFileSync(rawFile);
  const png = fs.readFileSync(pngFile);
  const out = {};
  const one = await call(classifier, "Classify", {raw, request_id: "js-1"});
  out.classify_raw = {digit: one.digit, request_id: one.request_id, probabilities: one.probabilities};
  out.classify_png = (await call(classifier, "Classify", {encoded: png})).digit;
  const batch = await call(classifier, "ClassifyBatch", {requests: [{raw}, {encoded: png}]});
  out.batch = batch.responses.map((r) => r.digit);
  out.info = (await call(classifier, "GetModelInfo", {})).name;
  out.models = (await call(classifier, "ListModels", {})).models.map((m) => `${m.name} ${m.state}`);
  const reading = await call(classifier, "ReadDigits", {image: fs.readFileSync(numberFile)});
  out.read = {text: reading.text, boxes: reading.digits.map((d) => [d.x, d.y, d.width, d.height])};
  out.bad = (await call(classifier, "Classify", {raw: Buffer.alloc(10)})).error;
  const infer = await call(oip, "ModelInfer", {
    model_name: "googlenet-fast",
    inputs: [{name: "image", datatype: "UINT8", shape: ["1", "28", "28"]}],
    raw_input_contents: [raw],
  });
  out.oip = {
    outputs: infer.outputs.map((o) => `${o.name} ${o.datatype} [${o.shape.join(",")}]`),
    digit: Number(infer.raw_output_contents[1].readBigInt64LE(0)),
  };
  out.oip_missing = (await call(oip, "ModelInfer", {model_name: "resnet"})).error;
  console.log(JSON.stringify(out));
  classifier.close();
  oip.close();
})();
